"""Which providers an artifact runs on: the asked ones, else its target's present here, else CPU with a warning."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest

from edgecompress import contract
from edgecompress.targets import profiles
from edgecompress.runtimes.artifact_files import artifact_providers
from edgecompress.runtimes.errors import ArtifactRuntimeError


def _folder(tmp_path, target):
    (tmp_path / contract.REPORT_FILE).write_text(json.dumps({"target": target} if target else {}))
    return tmp_path


def test_a_cpu_artifact_runs_on_cpu_without_a_warning(tmp_path):
    folder = _folder(tmp_path, profiles.load_profile("cpu-x86").describe())
    assert artifact_providers(folder) == ([("CPUExecutionProvider", {})], [])


def test_a_gpu_artifact_falls_back_to_cpu_with_one_warning(tmp_path):
    nano = profiles.load_profile("jetson-orin-nano")
    providers, warnings = artifact_providers(_folder(tmp_path, nano.describe()))
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert providers[0] == ("CUDAExecutionProvider", nano.provider_options["CUDAExecutionProvider"]) and not warnings
    else:
        assert providers == [("CPUExecutionProvider", {})]
        from edgecompress.runtimes.onnxruntime_install import describe

        assert warnings == ["the artifact's target jetson-orin-nano runs on CUDAExecutionProvider, which this "
                            f"onnxruntime ({describe()}) lacks; running on CPUExecutionProvider. To run it there: "
                            "pip install onnxruntime-gpu; on a Jetson, the Jetson AI Lab wheel for your JetPack "
                            "(README: On the device)"]


def test_a_malformed_report_target_is_one_line(tmp_path):
    broken = {**profiles.load_profile("cpu-x86").describe(), "threads": "two"}
    with pytest.raises(ArtifactRuntimeError, match="'threads' must be a positive integer"):
        artifact_providers(_folder(tmp_path, broken))


def test_asked_providers_win_and_an_old_report_means_cpu(tmp_path):
    assert artifact_providers(_folder(tmp_path, None)) == ([("CPUExecutionProvider", {})], [])
    assert artifact_providers(tmp_path, ["CPUExecutionProvider"]) == (["CPUExecutionProvider"], [])


def test_genai_config_names_the_targets_provider():
    from edgecompress.targets import profiles

    nano = profiles.load_profile("jetson-orin")
    options = contract.genai_provider_options(nano.execution_provider, nano.provider_options)
    assert options == [{"cuda": dict(nano.provider_options["CUDAExecutionProvider"])}]
    cpu = profiles.load_profile("cpu-x86")
    assert contract.genai_provider_options(cpu.execution_provider, cpu.provider_options) == []
