"""The memory budget: the arithmetic, the smallest ratio that fits, refusals with the numbers, and a build."""

from __future__ import annotations


import pytest

from edgecompress import api, memory_budget as mb
from edgecompress.targets import profiles
from edgecompress.errors import EdgeCompressError
from edgecompress.methods import resolve_method
from edgecompress.options import DEFAULT_METHOD, WeightFormats
from tests.helpers import assert_one_line_error, run_cli
from tests.tiny_models import save_tiny_model
from tests.test_build_compressed import CALIB, evaluation_file  # noqa: F401 (fixture)

# smollm2-135m's counts (tied lm_head): 30 layers, 3 KV heads of 64, 8192 positions.
SMOLLM2 = mb.ModelShape(134_515_008, 106_168_320, 28_311_552, True, 30, 3, 64, 8192)
FP16 = WeightFormats("fp16", 32, None, True)
NANO = profiles.load_profile("jetson-orin")


def test_kv_cache_and_weight_bytes_by_hand():
    # 2 (K and V) x 30 layers x 3 heads x 64 x 4096 tokens x 2 bytes
    assert mb.kv_cache_bytes(30, 3, 64, 4096, "float16") == 2 * 30 * 3 * 64 * 4096 * 2
    assert mb.weights_bytes(SMOLLM2, "fp32", 32, "float32") == 134_515_008 * 4  # the fp32 export's data file
    assert mb.weights_bytes(SMOLLM2, "fp16", 32, "float16", removed_params=1000) == (134_515_008 - 1000) * 2
    # int4 with blocks of 32: half a byte, an fp32 scale and a 4-bit zero point per block; the tied lm_head
    # gets its own quantized copy and the embedding stays fp32.
    per = 0.5 + 4.5 / 32
    other = 134_515_008 - 106_168_320
    assert mb.weights_bytes(SMOLLM2, "int4", 32, "float32") == pytest.approx(other * 4 + (106_168_320 + 28_311_552) * per)


def test_the_dense_model_fits_the_nano_and_no_ratio_is_picked():
    budget = mb.Budget.resolve(NANO, SMOLLM2, None, None)
    assert (budget.budget_gb, budget.context) == (3.8, 4096)
    ratio, section = mb.pick_ratio(budget, SMOLLM2, FP16, NANO)
    assert ratio is None and section["dense_estimate"]["total_gb"] < 3.8


def test_the_smallest_ratio_in_hundredths_that_fits_is_picked():
    budget = mb.Budget.resolve(NANO, SMOLLM2, 0.82, 4096)
    ratio, section = mb.pick_ratio(budget, SMOLLM2, FP16, NANO)
    fits = lambda r: budget.need(SMOLLM2, FP16, NANO, round(r * SMOLLM2.params)).total_gb <= 0.82  # noqa: E731
    assert ratio is not None and fits(ratio) and not fits(ratio - 0.01)
    assert section["estimate"]["total_gb"] <= 0.82 < section["dense_estimate"]["total_gb"]
    assert section["budget_source"] == "--max-memory" and section["context_source"] == "--context"


def test_no_ratio_fits_when_the_cache_alone_is_over_budget():
    budget = mb.Budget.resolve(NANO, SMOLLM2, 0.55, 8192)
    with pytest.raises(EdgeCompressError, match=r"KV cache at 8192 tokens and the workspace alone need 0\.689 GB"):
        mb.pick_ratio(budget, SMOLLM2, FP16, NANO)


def test_a_ratio_past_the_supported_range_is_refused_with_the_numbers():
    budget = mb.Budget.resolve(NANO, SMOLLM2, 0.62, 1024)
    with pytest.raises(EdgeCompressError, match=r"needs ratio 0\.\d+ > 0\.5"):
        mb.pick_ratio(budget, SMOLLM2, FP16, NANO)


def test_an_explicit_ratio_that_does_not_fit_is_refused():
    budget = mb.Budget.resolve(NANO, SMOLLM2, 0.82, 4096)
    with pytest.raises(EdgeCompressError, match=r"--ratio 0\.05 does not fit 0\.82 GB"):
        mb.check_fits(budget, SMOLLM2, FP16, NANO, 0.05)
    assert mb.check_fits(budget, SMOLLM2, FP16, NANO, 0.3)["estimate"]["total_gb"] <= 0.82


def test_context_defaults_and_limits():
    cpu = profiles.load_profile("cpu-x86")
    assert mb.Budget.resolve(cpu, SMOLLM2, None, None).context == 8192  # the model's own
    assert mb.Budget.resolve(profiles.load_profile("h100"), SMOLLM2, None, None).context == 8192  # capped
    with pytest.raises(EdgeCompressError, match="--context 9000 exceeds the model's maximum context 8192"):
        mb.Budget.resolve(NANO, SMOLLM2, None, 9000)


def _tiny_dense_gb(tiny_llama_dir) -> float:
    from transformers import AutoModelForCausalLM

    shape = mb.model_shape(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)))
    return shape, mb.weights_bytes(shape, "fp32", 32, "float32") / mb.GB


def test_model_shape_counts_a_real_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    shape = mb.model_shape(model)
    config = model.config  # tiny llama: tied, 3 layers of 64 wide, 4 heads, 2 KV heads, MLP 128
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128  # q, o; k, v (2 heads of 16); gate, up, down
    assert shape.lm_head_tied and shape.linear_params == config.num_hidden_layers * per_layer
    assert shape.params == sum(p.numel() for p in model.parameters()) and shape.embedding_params == 64 * 64
    assert (shape.num_layers, shape.kv_heads, shape.head_dim) == (3, 2, 16)


def test_the_kv_cache_stays_fp32_when_the_policy_keeps_it(tmp_path):
    path = tmp_path / "keep.toml"
    path.write_text('name="k"\ndescription="x"\ndevice="cuda"\nexecution_provider="CPUExecutionProvider"\n'
                    'dtype="float16"\n[fp16]\nkeep_io = ["logits", "present.0.key"]\n')
    keep = profiles.load_profile(str(path))
    assert mb.kv_dtype(keep, "fp16") == "float32" and mb.kv_dtype(NANO, "fp16") == "float16"
    assert mb.kv_dtype(profiles.load_profile("cpu-x86"), "int4") == "float32"


def test_a_build_over_budget_is_compressed_to_fit(calibration_file, evaluation_file, tmp_path):  # noqa: F811
    # Wide enough that the weights (4.5 MB) outweigh the graph file (the tiny test models' are as big as
    # their weights; a real model's graph is under 1 % of it), 2 layers to stay fast.
    model_dir = save_tiny_model(tmp_path / "wide", "llama", layers=2, hidden=256, intermediate=512)
    shape, dense_gb = _tiny_dense_gb(model_dir)
    kv_gb = mb.kv_cache_bytes(shape.num_layers, shape.kv_heads, shape.head_dim, 64, "float32") / mb.GB
    budget = 0.5 + kv_gb + 0.8 * dense_gb  # cpu-x86's workspace + the cache + 80 % of the weights
    report = api.build(str(model_dir), "cpu-x86", tmp_path / "fit", max_memory_gb=budget, context=64,
                       calibration=calibration_file, eval_data=evaluation_file, eval_limit=2, **CALIB)
    memory = report["memory"]
    assert memory["picked_ratio"] is not None and memory["picked_ratio"] >= 0.2
    assert report["compression"]["params"]["achieved_ratio"] >= memory["picked_ratio"]  # rounded up, never short
    assert memory["fits"] and memory["artifact"]["total_gb"] <= budget
    data = (tmp_path / "fit" / "model.onnx.data").stat().st_size + (tmp_path / "fit" / "model.onnx").stat().st_size
    assert memory["artifact"]["weights_gb"] == pytest.approx(data / 1e9, abs=1e-4)
    said = f"compressing with {DEFAULT_METHOD} ({resolve_method(DEFAULT_METHOD, memory['picked_ratio'])})"
    assert report["verification"]["passed"] and any(said in w for w in report["warnings"]), report["warnings"]


def test_the_cli_refuses_a_budget_nothing_fits_before_writing(tiny_llama_dir, tmp_path):
    result = run_cli("build", str(tiny_llama_dir), "--max-memory", "0.1", "-o", str(tmp_path / "out"))
    assert_one_line_error(result, "no compression ratio fits 0.1 GB")
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    result = run_cli("build", str(tiny_llama_dir), "--max-memory", "-1", "-o", str(tmp_path / "out"))
    assert_one_line_error(result, "--max-memory must be a positive number of GB")
