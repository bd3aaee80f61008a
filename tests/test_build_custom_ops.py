"""Builds whose target enables our LowRankMatMul (a user profile enables it on the CPU): the artifact uses
the op, carries the library, and runs in our runtime and in onnxruntime-genai like its lowered twin."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgecompress import api, contract
from edgecompress.errors import EdgeCompressError
from edgecompress.runtimes.generate import TextGenerator
from edgecompress.runtimes.kv_steps import NumpySteps
from tests.helpers import artifact_ops, custom_ops_library
from tests.tiny_models import WORDS

CALIB = dict(calib_sequences=2, calib_seq_len=16)
CPU_LOW_RANK = """name = "cpu-low-rank"
description = "the CPU with our LowRankMatMul enabled"
device = "cpu"
execution_provider = "CPUExecutionProvider"
dtype = "float32"
threads = 2
custom_ops = ["LowRankMatMul"]
"""
LOW_RANK = ("ai.edgecompress", "LowRankMatMul")
PROMPT = "cat sat on mat"


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("profiles") / "cpu-low-rank.toml"
    path.write_text(CPU_LOW_RANK)
    return path


def lowered_copy(artifact, folder):
    """The same artifact with LowerCustomOpsPass applied: two MatMuls per LowRankMatMul, no library."""
    import shutil

    import onnx_ir as ir

    from edgecompress.artifact import manifest
    from edgecompress.export import save_model, set_genai_custom_ops_library
    from edgecompress.passes import LowerCustomOpsPass

    shutil.copytree(artifact, folder, ignore=shutil.ignore_patterns("model.onnx*", "libedgecompress_ops.so"))
    model = ir.load(str(artifact / contract.MODEL_FILE))
    assert LowerCustomOpsPass()(model).modified
    save_model(model, folder)
    set_genai_custom_ops_library(folder, None)
    (folder / contract.CUSTOM_OPS_MANIFEST_FILE).unlink()
    report = json.loads((folder / contract.REPORT_FILE).read_text())
    report["manifest"] = manifest(folder)
    (folder / contract.REPORT_FILE).write_text(json.dumps(report))
    return folder


@pytest.fixture(scope="module")
def fused_and_lowered(tiny_llama_dir, profile_file, tmp_path_factory):
    """A compressed build for the profile (fused) and the same artifact lowered (its twin)."""
    custom_ops_library()
    folder = tmp_path_factory.mktemp("custom_ops")
    calibration = folder / "calib.txt"
    calibration.write_text(" ".join(WORDS * 6) + " .\n")
    fused = folder / "fused"
    report = api.build(str(tiny_llama_dir), str(profile_file), fused, ratio=0.2, method="grasp",
                       calibration=str(calibration), eval_limit=0, **CALIB)
    return fused, lowered_copy(fused, folder / "lowered"), report


def test_the_artifact_uses_the_op_and_carries_the_library(fused_and_lowered):
    fused, lowered, report = fused_and_lowered
    split = report["export"]["passes"]["ReplaceLayersPass"]["matmuls_split"]
    fuse_stats = report["export"]["optimize"]["custom_ops"]["FuseLowRankPass"]
    assert split > 0 and fuse_stats["fused"] == split and fuse_stats["skipped"] == {}
    assert artifact_ops(fused)[LOW_RANK] == split and artifact_ops(lowered)[LOW_RANK] == 0
    assert report["verification"]["optimized"]["passed"]
    for name in (contract.CUSTOM_OPS_LIBRARY_FILE, contract.CUSTOM_OPS_MANIFEST_FILE):
        assert (fused / name).is_file() and name in report["manifest"]
    manifest = json.loads((fused / contract.CUSTOM_OPS_MANIFEST_FILE).read_text())
    assert set(manifest["library"]["ops"]) >= {"LowRankMatMul"}
    genai = json.loads((fused / contract.GENAI_CONFIG_FILE).read_text())
    assert genai["model"]["decoder"]["session_options"]["custom_ops_library"] == contract.CUSTOM_OPS_LIBRARY_FILE
    assert api.inspect(fused)["custom_ops"] == ["ai.edgecompress::LowRankMatMul"]


def test_our_runtime_registers_the_library_and_matches_the_lowered_twin(fused_and_lowered):
    fused, lowered, _ = fused_and_lowered
    ours, twin = TextGenerator(fused), TextGenerator(lowered)
    ids = ours.encode(PROMPT)

    np.testing.assert_allclose(NumpySteps(ours.decoder)(ids), NumpySteps(twin.decoder)(ids), atol=1e-4, rtol=0)
    assert list(ours.stream_tokens(ids, 12)) == list(twin.stream_tokens(ids, 12))


GENAI_IN_A_FRESH_PROCESS = """
import json, sys
from tests.runtimes.genai_reference import genai_greedy
folder, ids = sys.argv[1], json.loads(sys.argv[2])
tokens, logits = genai_greedy(folder, ids, 12)
loaded = [line.split()[-1] for line in open("/proc/self/maps") if "libedgecompress_ops" in line]
print(json.dumps({"tokens": tokens, "last_logits": logits[0, -1].tolist(), "loaded": sorted(set(loaded))}))
"""


def test_onnxruntime_genai_takes_the_library_from_genai_config(fused_and_lowered, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("onnxruntime_genai")
    from tests.runtimes.genai_reference import without_eos

    fused, _, _ = fused_and_lowered
    generator = TextGenerator(fused)
    ids = generator.encode(PROMPT)
    # A fresh process (no library loaded yet) in another working directory: the relative path in
    # genai_config.json is resolved from the config's folder.
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-P", "-c", GENAI_IN_A_FRESH_PROCESS, str(fused), json.dumps(ids)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    theirs = json.loads(result.stdout.splitlines()[-1])

    assert theirs["loaded"] == [str(fused.resolve() / contract.CUSTOM_OPS_LIBRARY_FILE)]
    assert without_eos(list(generator.stream_tokens(ids, 12)), generator.eos_ids) == theirs["tokens"]
    np.testing.assert_allclose(theirs["last_logits"], NumpySteps(generator.decoder)(ids), atol=1e-4)


@pytest.fixture(scope="module")
def fp16_fused(fused_and_lowered, tiny_llama_dir, tmp_path_factory):
    """The same plan for a float16 GPU-style target with LowRankMatMul: fused, then converted to fp16."""
    from tests.test_build_fp16 import GPU_PROFILE

    folder = tmp_path_factory.mktemp("custom_ops_fp16")
    profile = folder / "gpu-low-rank.toml"
    profile.write_text(GPU_PROFILE.replace("fuse = true\n", 'fuse = true\ncustom_ops = ["LowRankMatMul"]\n'))
    data = folder / "data"
    data.mkdir()
    words = " ".join(WORDS[i * 7 % len(WORDS)] for i in range(1600))  # the activation scan's windows
    (data / "wiki.valid.tokens").write_text(words)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("EDGECOMPRESS_DATA", str(data))
    try:
        report = api.build(str(tiny_llama_dir), str(profile), folder / "fp16",
                           plan=fused_and_lowered[0] / contract.PLAN_DIR, eval_limit=0)
    finally:
        monkeypatch.undo()
    return folder / "fp16", lowered_copy(folder / "fp16", folder / "lowered"), report


def test_fp16_builds_feed_the_op_fp16_and_match_their_lowered_twin(fp16_fused):
    import onnx

    fp16, lowered, report = fp16_fused
    assert report["export"]["optimize"]["custom_ops"]["FuseLowRankPass"]["fused"] > 0
    assert report["precision"]["checks"]["a_artifact_vs_fp32"]["passed"]
    assert any("no CUDAExecutionProvider: verification and evaluation" in w for w in report["warnings"])
    proto = onnx.load(str(fp16 / contract.MODEL_FILE), load_external_data=False)
    initializers = {t.name: t.data_type for t in proto.graph.initializer}
    fused = [node for node in proto.graph.node if node.op_type == "LowRankMatMul"]
    assert fused and all(initializers[node.input[1]] == initializers[node.input[2]] == onnx.TensorProto.FLOAT16
                         for node in fused)
    ours, twin = TextGenerator(fp16), TextGenerator(lowered)
    ids = ours.encode(PROMPT)
    np.testing.assert_allclose(NumpySteps(ours.decoder)(ids), NumpySteps(twin.decoder)(ids), atol=2e-2, rtol=0)


@pytest.fixture
def no_library(monkeypatch):
    """A machine where `make kernels` was not run."""
    from edgecompress import custom_ops

    def missing():
        raise custom_ops.LibraryMissingError(
            f"the custom-op library {contract.CUSTOM_OPS_LIBRARY_FILE} is not built; run `make kernels`")

    monkeypatch.setattr(custom_ops, "library_file", missing)


def test_a_build_that_needs_the_missing_library_is_one_line_and_writes_nothing(tiny_llama_dir, profile_file,
                                                                               tmp_path, no_library):
    out = tmp_path / "out"
    with pytest.raises(EdgeCompressError, match="run `make kernels`") as error:
        api.build(str(tiny_llama_dir), str(profile_file), out, ratio=0.2, eval_limit=0, **CALIB)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_an_uncompressed_build_needs_no_library(tiny_llama_dir, profile_file, tmp_path, no_library):
    from edgecompress import pipeline
    from edgecompress.options import BuildOptions

    inputs = pipeline.prepare(BuildOptions(model=str(tiny_llama_dir), target=str(profile_file), out=str(tmp_path / "o")))

    assert inputs.profile.custom_ops == ("LowRankMatMul",)
    assert pipeline.session_options(inputs.profile)["custom_op_libraries"] == []


def test_a_plain_cpu_build_registers_nothing():
    from edgecompress import pipeline
    from edgecompress.targets import profiles

    assert pipeline.session_options(profiles.load_profile("cpu-x86"))["custom_op_libraries"] == []


def test_the_cli_names_make_kernels_and_exits_2(tiny_llama_dir, profile_file, tmp_path):
    from tests.helpers import assert_one_line_error, environment_without_data, run_cli

    env = environment_without_data(EDGECOMPRESS_OPS_LIBRARY=str(tmp_path / "missing.so"))
    out = tmp_path / "out"
    result = run_cli("build", str(tiny_llama_dir), "--target", str(profile_file), "--ratio", "0.2", "-o", str(out),
                     env=env)

    assert result.returncode == 2
    assert_one_line_error(result, "run `make kernels`")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_a_broken_carried_library_is_a_one_line_runtime_error(fused_and_lowered, tmp_path):
    import shutil

    from edgecompress.runtimes.errors import RuntimeLoadError
    from edgecompress.runtimes.session import create_session

    copy = tmp_path / "copy"
    shutil.copytree(fused_and_lowered[0], copy)
    (copy / contract.CUSTOM_OPS_LIBRARY_FILE).write_bytes(b"not an ELF file")

    with pytest.raises(RuntimeLoadError, match="custom-op library") as error:
        create_session(copy)
    assert "\n" not in str(error.value)
