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
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


RUNTIME_MODULES = ("decoder", "generate", "perplexity", "chat", "detokenize", "sampling", "kv_steps", "artifact_files",
                   "text_sources", "errors", "session")


def test_runtimes_do_not_import_torch_or_transformers():
    modules = ", ".join(f"edgecompress.runtimes.{name}" for name in RUNTIME_MODULES)
    loaded = _modules_after_import(modules)
    assert "torch" not in loaded and "transformers" not in loaded


def test_the_contract_and_errors_import_nothing_heavy():
    loaded = _modules_after_import("edgecompress.contract, edgecompress.errors, edgecompress.options")
    assert not {"torch", "transformers", "onnx", "onnx_ir", "onnxruntime", "numpy"} & loaded


def test_no_product_code_names_the_development_folder():
    """Data comes from the user, EDGECOMPRESS_DATA or the datasets library, never from ../shared."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for folder in ("edgecompress", "passes", "runtimes", "kernels", "targets"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            assert "shared/data" not in text and "parents[1]" not in text, path


def test_cli_verbs_other_than_build_do_not_import_torch_or_transformers():
    code = (
        "import sys\nsys.argv = ['edgecompress', 'targets', '--json']\nimport edgecompress.cli as cli\n"
        "try:\n    cli.app()\nexcept SystemExit:\n    pass\n"
        "print('heavy:', sorted({'torch', 'transformers'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert "heavy: []" in result.stdout and "cpu-x86" in result.stdout


def test_the_profile_verb_does_not_import_torch_transformers_or_onnx(tiny_llama_artifact):
    folder, _ = tiny_llama_artifact
    argv = ["edgecompress", "profile", str(folder), "-p", "4", "-n", "2", "-r", "1", "--ops-steps", "1", "--format", "json"]
    code = (
        f"import sys\nsys.argv = {argv!r}\nimport edgecompress.cli as cli\n"
        "try:\n    cli.app()\nexcept SystemExit:\n    pass\n"
        "print('heavy:', sorted({'torch', 'transformers', 'onnx', 'onnx_ir'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert "heavy: []" in result.stdout and '"schema": "edgecompress.profile/1"' in result.stdout


def test_runtimes_and_the_target_schema_import_no_compiler_module():
    """The runtime side (and the target schema it reads) loads only the contract, the errors and targets/."""
    modules = ", ".join(f"edgecompress.runtimes.{name}" for name in RUNTIME_MODULES)
    loaded = _modules_after_import(f"{modules}, edgecompress.runtimes.profiler.run, edgecompress.targets.profiles")
    ours = {m for m in loaded if m.startswith("edgecompress") and not m.startswith(("edgecompress.runtimes",
                                                                                     "edgecompress.targets"))}
    assert ours <= {"edgecompress", "edgecompress.contract", "edgecompress.errors", "edgecompress.folder_names"}, ours
