"""The runtime-only distribution (packaging/runtime_wheel.py), offline: what the wheel holds and declares, and
that every module of ours it imports is in it. The wheel in fresh venvs beside onnxruntime and onnxruntime-gpu
is .ci/runtime_smoke.sh (downloads; CI runs it)."""

from __future__ import annotations

import ast
import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Imports of compiler modules made only on the build's path, which a runtime-only install never takes: api.build's
# pipeline (refused in one line without it) and options.check_weight_format's MatMulNBits rules.
GUARDED = {"edgecompress.pipeline", "edgecompress.passes.quantize_weights",
           "edgecompress.passes.quantize_weights.check_format"}


def _load_builder():
    spec = importlib.util.spec_from_file_location("runtime_wheel", ROOT / "packaging" / "runtime_wheel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return _load_builder().build(tmp_path_factory.mktemp("dist"), python=sys.executable)


def _imports(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("edgecompress")}


def test_the_wheel_declares_the_runtime_dependencies_only(wheel):
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(archive.read(n).decode() for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    requires = sorted(line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")
                      and "extra ==" not in line)
    assert [r.split(">")[0].split("=")[0] for r in requires] == ["jinja2", "numpy", "rich", "tokenizers", "typer"]
    assert "Name: edgecompress-runtime" in metadata


def test_the_wheel_holds_the_runtime_and_no_compiler(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for needed in ("edgecompress/runtimes/generate.py", "edgecompress/runtimes/profiler/run.py",
                   "edgecompress/runtimes/onnxruntime_install.py", "edgecompress/targets/cpu-x86.toml",
                   "edgecompress/targets/profiles.py", "edgecompress/kernels/library.py", "edgecompress/cli.py"):
        assert needed in names, needed
    for compiler in ("edgecompress/pipeline.py", "edgecompress/compress.py", "edgecompress/export.py",
                     "edgecompress/attribution/__init__.py", "edgecompress/passes/__init__.py",
                     "edgecompress/kernels/triton/configs.py"):
        assert compiler not in names, compiler


def test_every_module_of_ours_the_runtime_imports_is_in_the_wheel(wheel):
    with zipfile.ZipFile(wheel) as archive:
        files = {n: archive.read(n).decode() for n in archive.namelist() if n.endswith(".py")}
    modules = {name[:-3].replace("/", ".").removesuffix(".__init__") for name in files}
    missing = {}
    for name, source in files.items():
        for imported in _imports(source) - GUARDED:
            # `from edgecompress import contract` names a module; `from x import Class` names an attribute of x
            if imported not in modules and imported.rsplit(".", 1)[0] not in modules:
                missing.setdefault(imported, []).append(name)
    assert not missing, missing
