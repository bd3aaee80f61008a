"""`build --weights/--fuse` on a tiny model: low-bit MatMuls and fused ops, checked against the fp32 export."""

from __future__ import annotations

import pytest

from edgecompress import api
from edgecompress.errors import VerificationError
from tests.helpers import artifact_ops as _ops
from tests.helpers import assert_one_line_error, run_cli


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_low_bit_fused_build_is_verified_against_the_fp32_export(tiny_llama_dir, tmp_path, weights):
    out = tmp_path / weights
    report = api.build(str(tiny_llama_dir), "cpu-x86", out, weights=weights, fuse=True, eval_limit=0)

    ops = _ops(out)
    # every Linear and the lm_head, q/k/v packed into one and gate/up into one (PackProjectionsPass)
    assert ops[("com.microsoft", "MatMulNBits")] == 4 * 3 + 1
    assert report["export"]["optimize"]["fusion"]["PackProjectionsPass"]["qkv_packed"] == 3
    assert ops[("ai.onnx", "MatMul")] < 7 * 3  # only attention's own MatMuls (if any) stay float
    assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 2 * 3
    optimized = report["verification"]["optimized"]
    assert optimized["passed"] and optimized["weights"] == weights
    compared = [check for check in optimized["checks"] if "mean_kl" in check]
    assert len(compared) == 3 and all(check["top1_agreement"] >= 0.7 for check in compared)
    assert report["weights"] == {"weights": weights, "block_size": 32, "accuracy_level": 4, "fuse": True}
    # The greedy tokens again at accuracy level 0 (fp32 activations): a warning when level 4 changes them.
    level = optimized["greedy"]["accuracy_level_0"]
    assert level["levels"] == [4] and len(level["tokens"]) == len(optimized["greedy"]["optimized"])
    assert level["identical"] == (level["tokens"] == optimized["greedy"]["optimized"])
    assert any("accuracy level 4 changes the greedy tokens" in w for w in report["warnings"]) != level["identical"]
    quantized = report["export"]["optimize"]["weights"]["QuantizeWeightsPass"]
    assert quantized["bytes_after"] < quantized["bytes_before"] / (3 if weights == "int8" else 6)
    # Still a plain artifact: the generate runtime loads it and stops at the token budget.
    result = api.generate(out, "the sky is", max_new_tokens=4)
    assert 1 <= len(result["tokens"]) <= 4


def test_fused_fp32_build_matches_the_export_exactly(tiny_llama_dir, tmp_path):
    report = api.build(str(tiny_llama_dir), "cpu-x86", tmp_path / "fused", fuse=True, eval_limit=0)
    optimized = report["verification"]["optimized"]
    assert optimized["greedy"]["identical"]
    assert all(check["max_abs_diff"] <= check["bound"] for check in optimized["checks"] if "bound" in check)
    fusion = report["export"]["optimize"]["fusion"]
    assert fusion["FuseGroupQueryAttentionPass"]["fused"] == 3 and "GQA" not in fusion["missing"]
    assert _ops(tmp_path / "fused")[("com.microsoft", "GroupQueryAttention")] == 3
    assert "weights" not in report["export"]["optimize"]


def test_plain_build_is_not_optimized(tiny_llama_artifact):
    _, report = tiny_llama_artifact
    assert "optimized" not in report["verification"] and "optimize" not in report["export"]
    assert report["weights"]["weights"] == "fp32" and not report["weights"]["fuse"]


def test_low_bit_beyond_the_target_bounds_fails_and_writes_nothing(tiny_llama_dir, tmp_path):
    target = tmp_path / "strict.toml"
    target.write_text(
        'name = "strict"\ndescription = "test"\ndevice = "cpu"\nexecution_provider = "CPUExecutionProvider"\n'
        'dtype = "float32"\nweight_formats = ["fp32", "int4"]\n[verify.int4]\nmax_mean_kl = 0.0\n'
    )
    with pytest.raises(VerificationError, match="mean KL"):
        api.build(str(tiny_llama_dir), str(target), tmp_path / "out", weights="int4", eval_limit=0)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["strict.toml"]  # no staging or reference copies left


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--weights", "int3"], "unknown weight format 'int3'"),
        (["--weights", "fp16"], "cannot run fp16 weights"),
        (["--weights", "int4", "--block-size", "48"], "block size must be one of"),
    ],
)
def test_bad_weight_options_are_refused_before_loading(tiny_llama_dir, tmp_path, args, fragment):
    result = run_cli("build", str(tiny_llama_dir), "-o", str(tmp_path / "out"), *args)
    assert_one_line_error(result, fragment)
    assert result.returncode == 2 and not (tmp_path / "out").exists()


def test_int4_on_a_target_without_it_is_refused(tiny_llama_dir, tmp_path):
    target = tmp_path / "fp32-only.toml"
    target.write_text(
        'name = "fp32-only"\ndescription = "test"\ndevice = "cpu"\n'
        'execution_provider = "CPUExecutionProvider"\ndtype = "float32"\n'
    )
    result = run_cli("build", str(tiny_llama_dir), "-t", str(target), "-o", str(tmp_path / "out"), "--weights", "int4")
    assert_one_line_error(result, "target 'fp32-only' cannot run int4 weights; it supports fp32")
    assert not (tmp_path / "out").exists()


def test_low_bit_weights_are_fused_by_default_on_cpu_x86(tiny_llama_dir, tmp_path):
    report = api.build(str(tiny_llama_dir), "cpu-x86", tmp_path / "int8", weights="int8", eval_limit=0)
    assert report["weights"]["fuse"] is True
    assert _ops(tmp_path / "int8")[("com.microsoft", "GroupQueryAttention")] == 3
    plain = api.build(str(tiny_llama_dir), "cpu-x86", tmp_path / "plain", weights="int8", fuse=False, eval_limit=0)
    assert plain["weights"]["fuse"] is False and "fusion" not in plain["export"]["optimize"]


def test_a_dtype_this_version_does_not_build_is_refused_before_loading(tiny_llama_dir, tmp_path):
    target = tmp_path / "gpu.toml"
    target.write_text('name = "gpu"\ndescription = "test"\ndevice = "cuda"\n'
                      'execution_provider = ["CUDAExecutionProvider"]\ndtype = "bfloat16"\n')
    result = run_cli("build", str(tiny_llama_dir), "-t", str(target), "-o", str(tmp_path / "out"))
    assert_one_line_error(result, "target 'gpu' asks for bfloat16 artifacts; this version builds float32, float16")
    assert result.returncode == 2 and not (tmp_path / "out").exists()


def test_fp16_weights_are_refused_on_a_cpu_target(tiny_llama_dir, tmp_path):
    result = run_cli("build", str(tiny_llama_dir), "--weights", "fp16", "-o", str(tmp_path / "out"))
    assert_one_line_error(result, "target 'cpu-x86' cannot run fp16 weights; it supports fp32, int8, int4")
    assert result.returncode == 2 and not (tmp_path / "out").exists()
