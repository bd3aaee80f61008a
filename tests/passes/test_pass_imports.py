"""Passes run where torch is absent: importing any of them must not pull it in."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import edgecompress.passes


def test_passes_do_not_import_torch():
    modules = [f"edgecompress.passes.{info.name}" for info in pkgutil.iter_modules(edgecompress.passes.__path__)]
    assert "edgecompress.passes.split_low_rank" in modules  # the walk found the package's modules
    code = (
        "import sys\n"
        f"import {', '.join(modules)}\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-P", "-c", code], check=True)


def test_every_pass_is_exported_and_named_verb_object():
    import onnx_ir as ir

    passes = {name: obj for name, obj in vars(edgecompress.passes).items()
              if isinstance(obj, type) and issubclass(obj, ir.passes.PassBase)}
    files = {info.name for info in pkgutil.iter_modules(edgecompress.passes.__path__)}
    for name, cls in passes.items():
        module = cls.__module__.rsplit(".", 1)[-1]
        words = [part.capitalize() for part in module.split("_")]
        assert name == "".join(words) + "Pass", f"{name} lives in {module}.py"
    defined = set()
    for module in files:
        loaded = __import__(f"edgecompress.passes.{module}", fromlist=["_"])
        defined |= {n for n, o in vars(loaded).items() if isinstance(o, type) and issubclass(o, ir.passes.PassBase)
                    and o.__module__ == loaded.__name__}
    assert defined == set(passes)
