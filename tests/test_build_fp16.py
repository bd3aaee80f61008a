"""`build` for a float16 target on a tiny model: fusions, activation scan, fp16 conversion with logits
in fp32, its fp16-storage twin, the precision report, and the runtimes on the fp16 artifact (on CPU)."""

from __future__ import annotations

import json

import onnx
import pytest

from edgecompress import api
from tests.tiny_models import WORDS

GPU_PROFILE = """name = "test-gpu"
description = "a float16 CUDA target, built and validated on the CPU"
device = "cuda"
execution_provider = ["CUDAExecutionProvider", "CPUExecutionProvider"]
dtype = "float16"
weight_formats = ["fp16"]
weights = "fp16"
fuse = true
[fp16]
keep_io = ["logits"]
absmax_block = 16384.0
[verify.float16]
max_mean_kl = 0.002
min_top1_agreement = 0.98
max_abs_logit_delta = 1.0
"""


@pytest.fixture(scope="module")
def fp16_build(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp16")
    target = folder / "test-gpu.toml"
    target.write_text(GPU_PROFILE)
    data = folder / "data"
    data.mkdir()
    words = " ".join(WORDS[i * 7 % len(WORDS)] for i in range(1600))  # > 5 windows of 256 tokens
    (data / "wiki.valid.tokens").write_text(words)
    (data / "wiki.test.raw").write_text(words)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("EDGECOMPRESS_DATA", str(data))
    try:
        out = folder / "out"
        report = api.build(str(tiny_llama_dir), str(target), out, eval_limit=0)
    finally:
        monkeypatch.undo()
    return out, report, data


def test_fp16_artifact_has_fp16_cache_and_fp32_logits(fp16_build):
    out, _, _ = fp16_build
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert types["logits"] == onnx.TensorProto.FLOAT
    assert types["past_key_values.0.key"] == types["present.2.value"] == onnx.TensorProto.FLOAT16
    assert dims["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]  # dims survive
    ops = {(node.domain or "ai.onnx", node.op_type) for node in model.graph.node}
    assert ("com.microsoft", "GroupQueryAttention") in ops  # fused before conversion
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["precision"]["dtype"] == "float16" and "precision" not in on_disk["export"]["optimize"]
    assert on_disk["weights"]["weights"] == "fp16"


def test_precision_section_records_the_three_checks(fp16_build):
    _, report, data = fp16_build
    precision = report["precision"]
    assert precision["escalation"] == ["float16"] and precision["runs_on_build_machine"]
    scan = precision["scan"]
    assert str(data) in scan["source"] and scan["windows"] == 4 and scan["tokens"] == 4 * 256
    assert scan["top"][0]["absmax"] >= scan["top"][-1]["absmax"] and scan["masks"]["tensors"] >= 1
    assert all(row["absmax"] < 65504 for row in scan["top"])  # the mask's finfo.min is reported apart
    # Rotary: inside GroupQueryAttention, from cos/sin caches computed in fp32 at build time (stored in fp16
    # like any weight, values in [-1, 1]); no cos/sin is computed from positions in fp16 (blocked if it were).
    model = onnx.load(str(fp16_build[0] / "model.onnx"), load_external_data=False)
    rotating = [node for node in model.graph.node if node.op_type == "GroupQueryAttention"
                and any(a.name == "do_rotary" and a.i == 1 for a in node.attribute)]
    assert len(rotating) == 3 and not any(node.op_type in ("Cos", "Sin") for node in model.graph.node)
    assert not any("rotary" in reason for reason in precision["node_block_list"].values())
    for check in ("a_artifact_vs_fp32", "c_twin_vs_fp32"):
        summary = precision["checks"][check]["summary"]
        assert summary["passed"] and summary["nonfinite"] == 0
        assert summary["mean_kl"] < 0.002 and summary["top1_agreement"] >= 0.98
        assert summary["positions"] > 256  # the verification text, its padded batch and a held-out window
    names = [check["check"] for check in precision["checks"]["c_twin_vs_fp32"]["checks"]]
    assert any(name.startswith("padded batch") for name in names)
    assert any(name.startswith("held-out prefill") for name in names)
    optimized = report["verification"]["optimized"]
    assert optimized["passed"] and optimized["weights"] == "fp16"
    assert any(check["check"].startswith("top-1 agreement over") for check in optimized["checks"])
    assert optimized["greedy"]["kv_cache_in_place"] == optimized["greedy"]["optimized"]  # fp16 cache, in place


def test_generate_and_eval_run_on_the_fp16_artifact(fp16_build):
    out, _, data = fp16_build
    result = api.generate(out, "the sky is", max_new_tokens=4)
    assert 1 <= len(result["tokens"]) <= 4
    scored = api.eval(out, data / "wiki.test.raw", limit=2, seq_len=64)
    assert scored["perplexity"] > 1.0 and scored["windows"] == 2
