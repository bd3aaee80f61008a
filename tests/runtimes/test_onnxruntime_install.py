"""What the device needs to run an artifact: report.json's `requirements`, and one line when its onnxruntime is
missing or too old, or when the compiler is missing for `build` (a runtime-only install)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import onnxruntime as ort
import pytest

from edgecompress import api, contract
from edgecompress.runtimes.errors import ArtifactRuntimeError
from edgecompress.runtimes.onnxruntime_install import check, describe, distributions
from edgecompress.targets import profiles
from tests.helpers import assert_one_line_error

# A child Python in which importing `blocked` fails as if it were not installed, then the CLI with ARGS.
BLOCKING_CLI = """
import sys
blocked = sys.argv.pop(1)
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == blocked or name.startswith(blocked + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
from edgecompress.cli import main
sys.argv[0] = "edgecompress"
main()
"""


def _cli_without(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-c", BLOCKING_CLI, module, *args], capture_output=True, text=True,
                          timeout=300)


def test_the_report_says_what_the_device_needs(tiny_llama_artifact):
    folder, report = tiny_llama_artifact
    assert report["requirements"] == {"onnxruntime": "onnxruntime", "min_version": profiles.MIN_ONNXRUNTIME,
                                      "execution_provider": "CPUExecutionProvider", "custom_op_library": None}
    assert api.inspect(folder)["requirements"] == report["requirements"]
    nano = profiles.runtime_requirements(profiles.load_profile("jetson-orin-nano"), {"library": {
        "ort_api_version": 21, "ops": ["LowRankMatMul"], "cubins": {"sms": [87]}}})
    assert nano == {"onnxruntime": "onnxruntime-gpu", "min_version": "1.21", "execution_provider":
                    "CUDAExecutionProvider", "custom_op_library": {"file": contract.CUSTOM_OPS_LIBRARY_FILE,
                                                                   "ops": ["LowRankMatMul"], "ort_api_version": 21,
                                                                   "cuda_sms": [87]}}


def test_this_machines_onnxruntime_is_named():
    found = distributions()
    assert found and all(version for _, version in found)
    assert ort.__version__ in describe()


def test_an_onnxruntime_older_than_the_artifact_needs_is_one_line(tiny_llama_artifact, tmp_path):
    folder = tmp_path / "artifact"
    shutil.copytree(tiny_llama_artifact[0], folder)
    report = json.loads((folder / contract.REPORT_FILE).read_text())
    report["requirements"]["min_version"] = "99.1"
    (folder / contract.REPORT_FILE).write_text(json.dumps(report))
    with pytest.raises(ArtifactRuntimeError, match=r"older than this artifact needs \(>= 99.1\): pip install -U "
                                                    r"onnxruntime$"):
        check(folder)


@pytest.mark.parametrize("verb", [["generate", "{out}", "the sky is", "-n", "2"], ["eval", "{out}", "--limit", "1"],
                                  ["profile", "{out}", "-p", "4", "-n", "2"]])
def test_without_onnxruntime_every_runtime_verb_names_what_to_install(tiny_llama_artifact, verb):
    args = [part.format(out=tiny_llama_artifact[0]) for part in verb]
    result = _cli_without("onnxruntime", *args)
    assert_one_line_error(result, "no onnxruntime is installed: this artifact runs on CPUExecutionProvider; "
                                  "pip install onnxruntime")
    assert result.returncode == 2


def test_inspect_needs_no_onnx_and_no_onnxruntime(tiny_llama_artifact):
    result = _cli_without("onnx", "inspect", str(tiny_llama_artifact[0]), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["nodes"] > 0


def test_build_without_the_compiler_is_one_line(tiny_llama_dir, tmp_path):
    result = _cli_without("edgecompress.pipeline", "build", str(tiny_llama_dir), "-o", str(tmp_path / "out"))
    assert_one_line_error(result, "build needs the compiler: this is the runtime-only install (edgecompress-runtime)")
    assert not (tmp_path / "out").exists()


def test_the_compiler_and_the_runtime_installed_together_are_named(monkeypatch):
    from importlib import metadata

    from edgecompress.runtimes import onnxruntime_install

    versions = {"edgecompress": "0.1.0"}

    def version(name):
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(onnxruntime_install.metadata, "version", version)
    assert onnxruntime_install.both_edgecompress_distributions() is None
    versions["edgecompress-runtime"] = "0.1.0"
    assert onnxruntime_install.both_edgecompress_distributions() == (
        "edgecompress 0.1.0 and edgecompress-runtime 0.1.0 are both installed; they are one package in two "
        "distributions: pip uninstall edgecompress-runtime (the compiler holds the runtime)")
