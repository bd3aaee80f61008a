"""FuseLowRankPass: the fused graph, the pairs it leaves with their reason, and numerics (lowered back, and
with our library when it can be built)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from edgecompress.passes.fuse_low_rank import FuseLowRankPass
from edgecompress.passes.layer_map import LOW_RANK_FACTOR_KEY, NAME_SCOPES_KEY
from edgecompress.passes.lower_custom_ops import LowerCustomOpsPass
from edgecompress.passes.quantize_weights import QuantizeWeightsPass
from edgecompress.passes.split_low_rank import SplitLowRankPass
from tests.helpers import custom_ops_library

Q_PROJ = "model.layers.0.self_attn.q_proj"


def _factors(rank, out_features=4, in_features=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rank, in_features)).astype(np.float32),
            rng.standard_normal((out_features, rank)).astype(np.float32))


def _split_toy(toy_decoder, modules=(Q_PROJ, "lm_head")):
    model = toy_decoder([0, 1])
    SplitLowRankPass({m: _factors(2, out_features=6 if m == "lm_head" else 4) for m in modules})(model)
    return model


def test_each_marked_pair_becomes_one_low_rank_matmul(toy_decoder):
    model = _split_toy(toy_decoder)
    before = [node for node in model.graph]
    q_second = next(n for n in before if n.outputs[0].name == f"{Q_PROJ}.out")
    q_first = q_second.inputs[0].producer()
    q_inputs = [q_first.inputs[0].name, q_first.inputs[1].name, q_second.inputs[1].name]
    q_scopes = q_second.metadata_props[NAME_SCOPES_KEY]
    other_nodes = [(n.op_type, n.outputs[0].name) for n in before if LOW_RANK_FACTOR_KEY not in n.metadata_props]

    result = FuseLowRankPass()(model)

    assert result.modified and result.stats.fused == 2 and result.stats.skipped == {}
    fused = next(n for n in model.graph if n.outputs[0].name == f"{Q_PROJ}.out")
    assert (fused.domain, fused.op_type) == ("ai.edgecompress", "LowRankMatMul")
    assert [v.name for v in fused.inputs] == q_inputs
    assert fused.metadata_props[NAME_SCOPES_KEY] == q_scopes and LOW_RANK_FACTOR_KEY not in fused.metadata_props
    assert [(n.op_type, n.outputs[0].name) for n in model.graph if n.domain == ""] == other_nodes
    assert model.graph.outputs[0].name == "logits" and model.graph.outputs[0].producer().op_type == "LowRankMatMul"
    assert model.graph.opset_imports["ai.edgecompress"] == 1


def test_lowering_undoes_fusing(toy_decoder, decoder_parity):
    split = _split_toy(toy_decoder)
    feeds = {"input_ids": np.array([[1, 2, 3]], dtype=np.int64)}
    for position in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{position}.{kind}"] = np.ones((1, 1, 2, 4), dtype=np.float32) * (position + 1)
    expected = decoder_parity.onnx(split, feeds)
    model = _split_toy(toy_decoder)
    FuseLowRankPass()(model)

    lowered = LowerCustomOpsPass()(model)

    assert lowered.stats.lowered == {"LowRankMatMul": 2}
    assert sum(n.metadata_props.get(LOW_RANK_FACTOR_KEY) == "B" for n in model.graph) == 2  # fusable again
    decoder_parity.assert_close(decoder_parity.onnx(model, feeds), expected, atol=1e-6)


def test_nothing_marked_is_no_change(toy_decoder, structure):
    model = toy_decoder([0])
    before = structure(model)

    result = FuseLowRankPass()(model)

    assert not result.modified and result.stats.fused == 0
    assert structure(model) == before and "ai.edgecompress" not in model.graph.opset_imports


def test_quantized_factors_are_skipped_with_the_reason(toy_decoder):
    model = _split_toy(toy_decoder, modules=(Q_PROJ,))
    # The toy's in_features are 4: pad nothing, quantize with the smallest block.
    QuantizeWeightsPass(bits=4, block_size=32)(model)

    result = FuseLowRankPass()(model)

    assert not result.modified
    assert result.stats.skipped == {"factor B quantized to MatMulNBits": 1}


def test_a_shared_intermediate_is_skipped(toy_decoder):
    model = _split_toy(toy_decoder, modules=(Q_PROJ,))
    first = next(n for n in model.graph if n.metadata_props.get(LOW_RANK_FACTOR_KEY) == "A")
    reader = ir.node("Relu", [first.outputs[0]])
    model.graph.append(reader)
    model.graph.outputs.append(reader.outputs[0])
    reader.outputs[0].name = "extra"

    result = FuseLowRankPass()(model)

    assert result.stats.fused == 0 and result.stats.skipped == {"the rank-R intermediate has other readers": 1}


def test_a_gemm_factor_is_skipped():
    from tests.passes.test_pass_split_low_rank import _single_linear_graph

    rng = np.random.default_rng(0)
    model = _single_linear_graph("gemm", rng.standard_normal((3, 5)).astype(np.float32),
                                 rng.standard_normal(3).astype(np.float32))
    SplitLowRankPass({"fc": _factors(2, out_features=3, in_features=5)})(model)

    result = FuseLowRankPass()(model)

    assert result.stats.skipped == {"factor B is a Gemm, not a MatMul": 1}


@pytest.fixture(scope="module")
def qwen2_split(exported_qwen2):
    """Qwen2's q_proj has a bias Add behind its MatMul; split two Linears of layer 0."""
    from tests.passes.conftest import svd_factors

    torch_model, path = exported_qwen2
    factors = {}
    for module in (Q_PROJ, "model.layers.0.mlp.up_proj"):
        weight = torch_model.get_submodule(module).weight.detach().numpy()
        factors[module] = svd_factors(weight, 3)

    def make():
        model = ir.load(path)
        SplitLowRankPass(factors)(model)
        return model

    return make


def test_the_bias_add_is_fused_and_lowering_matches(qwen2_split, decoder_parity):
    feeds = decoder_parity.feeds(3)
    expected = decoder_parity.onnx(qwen2_split(), feeds)
    model = qwen2_split()
    adds_before = sum(n.op_type == "Add" for n in model.graph)

    result = FuseLowRankPass()(model)

    assert result.stats.fused == 2 and result.stats.with_bias == 1
    assert sum(n.op_type == "Add" for n in model.graph) == adds_before - 1
    fused = [n for n in model.graph if n.op_type == "LowRankMatMul"]
    assert sorted(len(n.inputs) for n in fused) == [3, 4]
    LowerCustomOpsPass()(model)
    decoder_parity.assert_close(decoder_parity.onnx(model, feeds), expected, atol=1e-5)


def test_the_fused_graph_runs_with_our_library(qwen2_split, decoder_parity, tmp_path):
    import onnxruntime as ort

    library = custom_ops_library()
    feeds = decoder_parity.feeds(3)
    expected = decoder_parity.onnx(qwen2_split(), feeds)
    model = qwen2_split()
    FuseLowRankPass()(model)
    ir.save(model, tmp_path / "model.onnx", external_data="model.onnx.data")

    options = ort.SessionOptions()
    options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    decoder_parity.assert_close(dict(zip(names, session.run(None, feeds))), expected, atol=1e-4)
