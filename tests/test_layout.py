"""Packaging rules: namespaced subpackages, and runtimes/passes free of torch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys


def test_subpackages_live_under_the_edgecompress_namespace():
    for name in ("passes", "runtimes", "kernels", "targets"):
        assert importlib.util.find_spec(f"edgecompress.{name}") is not None
    for name in ("passes", "runtimes", "kernels"):
        spec = importlib.util.find_spec(name)
        assert spec is None or "edgecompress" not in str(spec.origin), f"top-level '{name}' leaked"


def test_target_profiles_ship_as_package_data():
    from importlib import resources

    assert resources.files("edgecompress.targets").joinpath("cpu-x86.toml").is_file()


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


RUNTIME_MODULES = ("decoder", "generate", "perplexity", "chat", "detokenize", "sampling", "kv_steps", "artifact_files")


def test_runtimes_do_not_import_torch_or_transformers():
    modules = ", ".join(f"edgecompress.runtimes.{name}" for name in RUNTIME_MODULES)
    loaded = _modules_after_import(modules)
    assert "torch" not in loaded and "transformers" not in loaded
