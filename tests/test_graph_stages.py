"""The optimize stage on a copy of the tiny built artifact: one load, the pass list, one save; still runs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgecompress import graph_stages
from edgecompress.errors import EdgeCompressError
from edgecompress.export import save_model
from edgecompress.options import WeightFormats, check_weight_format


@pytest.fixture
def artifact(tiny_llama_artifact, tmp_path):
    folder = tmp_path / "artifact"
    shutil.copytree(tiny_llama_artifact[0], folder)
    return folder


def _logits(folder) -> np.ndarray:
    from edgecompress.runtimes.decoder import OrtDecoder

    decoder = OrtDecoder(folder)
    ids = np.array([[3, 5, 7, 9, 11, 13]], dtype=np.int64)
    out = decoder.forward(ids, np.ones_like(ids), np.arange(6, dtype=np.int64)[None], decoder.empty_cache(1))
    return out[0]


@pytest.mark.parametrize("weights,bits", [("int4", 4), ("int8", 8)])
def test_quantize_then_fuse_in_one_stage(artifact, tmp_path, weights, bits):
    import onnx_ir as ir

    dense = _logits(artifact)
    size_before = (artifact / "model.onnx.data").stat().st_size
    model = graph_stages.load_model(artifact)

    report = graph_stages.run_stage(model, graph_stages.optimize_passes(WeightFormats(weights, 32, 4, True)))
    out = tmp_path / "optimized"
    save_model(model, out)

    stats = report["weights"]["QuantizeWeightsPass"]
    assert stats["matmuls_quantized"] == 3 * 7 + 1 and stats["lm_head_quantized"]
    assert report["fusion"]["FuseOrtOpsPass"]["fused_ops"]["SkipSimplifiedLayerNormalization"] == 6
    assert (out / "model.onnx.data").stat().st_size < size_before
    saved = ir.load(str(out / "model.onnx"))
    nodes = [node for node in saved.graph if node.op_type == "MatMulNBits"]
    # 3 layers x (q/k/v packed, o, gate/up packed, down) + the lm_head (PackProjectionsPass)
    assert report["fusion"]["PackProjectionsPass"]["projections_packed"] == 3 * 5
    assert len(nodes) == 3 * 4 + 1 and {node.attributes.get_int("bits") for node in nodes} == {bits}
    logits = _logits(out)
    assert logits.shape == dense.shape and np.isfinite(logits).all()
    drift = np.abs(logits - dense).max() / np.abs(dense).max()
    assert drift < (0.3 if bits == 4 else 0.03)  # the tiny model's random weights: see the pass tests


def test_fp32_unfused_has_no_passes(artifact):
    model = graph_stages.load_model(artifact)
    nodes = len(model.graph)
    assert graph_stages.optimize_passes(WeightFormats("fp32", 32, 4, False)) == []
    assert graph_stages.run_stage(model, []) == {} and len(model.graph) == nodes


@pytest.mark.parametrize("args,message", [
    (("int3", 32), "unknown weight format"),
    (("int4", 48), "block size must be one of"),
])
def test_bad_format_is_refused_before_any_pass(args, message):
    with pytest.raises(EdgeCompressError, match=message):
        check_weight_format(*args)


def test_fp16_weights_only_fuse_in_the_pass_list():
    """fp16 is a whole-graph conversion after the fusions (edgecompress.half_precision), not a weight pass."""
    passes = graph_stages.optimize_passes(WeightFormats("fp16", 32, 4, True))
    assert [(role, type(p).__name__) for role, p in passes] == [
        (graph_stages.FUSION, "FuseOrtOpsPass"), (graph_stages.FUSION, "FuseGroupQueryAttentionPass"),
        (graph_stages.FUSION, "PackProjectionsPass"), (graph_stages.FUSION, "RemoveIdentityExpandsPass"),
        (graph_stages.FUSION, "ShareKvBufferPass")]


def test_missing_gguf_source_is_refused():
    from edgecompress.gguf_blocks import exact_blocks

    with pytest.raises(EdgeCompressError, match="does not exist"):
        exact_blocks("/nonexistent/model.gguf", "int4")


def test_a_pass_error_is_the_users_one_line_error(artifact):
    """Sequential would wrap a PassInputError in PassError; the stage lets it through as it is."""
    from edgecompress.passes import RemoveLayersPass

    model = graph_stages.load_model(artifact)
    with pytest.raises(EdgeCompressError, match="cannot remove layers \\[7\\]"):
        graph_stages.run_stage(model, [(None, RemoveLayersPass([7]))])


def _split_one_linear(model, module="model.layers.1.mlp.up_proj", rank=4):
    from edgecompress.passes import SplitLowRankPass, build_layer_map

    site = build_layer_map(model.graph).find_linear(module)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rank, site.in_features)).astype(np.float32)
    b = rng.standard_normal((site.out_features, rank)).astype(np.float32)
    SplitLowRankPass({module: (a, b)})(model)


@pytest.mark.parametrize("weights,fused,skipped", [
    ("fp32", 1, {}),
    ("int4", 0, {"factor B quantized to MatMulNBits": 1}),  # the factors stay MatMulNBits
])
def test_low_rank_fusion_follows_the_weight_format_and_survives_ort_fusions(artifact, weights, fused, skipped):
    model = graph_stages.load_model(artifact)
    _split_one_linear(model)

    passes = graph_stages.optimize_passes(WeightFormats(weights, 32, 4, True), fuse_low_rank=True)
    report = graph_stages.run_stage(model, passes)

    stats = report["custom_ops"]["FuseLowRankPass"]
    assert (stats["fused"], stats["skipped"]) == (fused, skipped)
    assert sum(node.op_type == "LowRankMatMul" for node in model.graph) == fused  # kept by the ORT fusions
    assert report["fusion"]["FuseOrtOpsPass"]["fused_ops"]["SkipSimplifiedLayerNormalization"] == 6


def test_the_plan_stage_lowers_the_ops_the_target_does_not_enable():
    from edgecompress.passes import LowerCustomOpsPass

    class NoPlan:
        layers, factors, removed_layers = [], {}, []

    passes = [pass_ for _, pass_ in graph_stages.plan_passes(NoPlan(), custom_ops=("LowRankMatMul",))]

    lowering = next(pass_ for pass_ in passes if isinstance(pass_, LowerCustomOpsPass))
    assert lowering.ops == ("MonarchMatMul", "BlastMatMul")
