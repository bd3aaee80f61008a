"""SplitLowRankPass: before/after on a toy decoder graph, parity with PyTorch on exported models."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from edgecompress.errors import EdgeCompressError
from edgecompress.passes.layer_map import build_layer_map
from edgecompress.passes.split_low_rank import SplitLowRankPass

LINEAR_CLASS = "torch.nn.modules.linear.Linear"
LAYER_1 = [f"model.layers.1.{part}" for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)]


def _factors(rank: int, out_features: int = 4, in_features: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rank, in_features)).astype(np.float32)
    b = rng.standard_normal((out_features, rank)).astype(np.float32)
    return a, b


def test_split_gives_the_graph_built_with_two_matmuls(toy_decoder, structure):
    factors = {"model.layers.1.self_attn.q_proj": _factors(2), "lm_head": _factors(3, out_features=6, seed=1)}
    model = toy_decoder([0, 1, 2])

    result = SplitLowRankPass(factors)(model)

    assert result.modified and result.model is model
    assert structure(model) == structure(toy_decoder([0, 1, 2], low_rank=factors))


def test_counts_for_the_report(toy_decoder):
    split = SplitLowRankPass({"model.layers.0.mlp.down_proj": _factors(1), "lm_head": _factors(2, out_features=6)})

    split_result = split(toy_decoder([0, 1]))

    assert split_result.stats.matmuls_split == 2
    assert split_result.stats.params_before == 4 * 4 + 6 * 4
    assert split_result.stats.params_after == (1 * 4 + 4 * 1) + (2 * 4 + 6 * 2)


def test_split_linear_still_maps_to_one_site(toy_decoder):
    model = toy_decoder([0, 1])
    SplitLowRankPass({"model.layers.0.self_attn.k_proj": _factors(2)})(model)

    site = build_layer_map(model.graph).find_linear("model.layers.0.self_attn.k_proj")

    assert site.weight.name == "model.layers.0.self_attn.k_proj.low_rank_b_t"


def test_no_factors_is_no_change(toy_decoder, structure):
    model = toy_decoder([0])
    before = structure(model)

    assert not SplitLowRankPass({})(model).modified
    assert structure(model) == before


@pytest.mark.parametrize(
    ("factors", "message"),
    [
        ({"model.layers.7.self_attn.q_proj": _factors(2)}, "not a Linear found"),
        ({"model.layers.0.self_attn.q_proj": _factors(2, in_features=5)}, r"give a \[4, 5\] weight"),
        ({"model.layers.0.self_attn.q_proj": _factors(2, out_features=3)}, r"give a \[3, 4\] weight"),
        ({"model.layers.0.self_attn.q_proj": (np.ones((2, 4)), np.ones((4, 3)))}, "must be A"),
    ],
)
def test_bad_factors_are_user_errors(toy_decoder, factors, message):
    with pytest.raises(EdgeCompressError, match=message) as error:
        SplitLowRankPass(factors)(toy_decoder([0, 1]))
    assert "\n" not in str(error.value)


def test_splitting_twice_is_a_user_error(toy_decoder):
    model = toy_decoder([0])
    SplitLowRankPass({"lm_head": _factors(2, out_features=6)})(model)

    with pytest.raises(EdgeCompressError, match="already split"):
        SplitLowRankPass({"lm_head": _factors(2, out_features=6)})(model)


def test_full_rank_factors_reproduce_the_dense_llama(fresh_torch_and_onnx, decoder_parity, factors_for):
    torch_model, onnx_model = fresh_torch_and_onnx
    initializers_before = set(onnx_model.graph.initializers)

    split = SplitLowRankPass(factors_for(torch_model, LAYER_1 + ["lm_head"]))
    split_result = split(onnx_model)

    assert split_result.stats.matmuls_split == 8
    # The dense weights are gone, not just unused.
    layer_map = build_layer_map(onnx_model.graph)
    for module in LAYER_1:
        assert layer_map.find_linear(module).weight.name.endswith("low_rank_b_t")
    assert len(set(onnx_model.graph.initializers) - initializers_before) == 16
    feeds = decoder_parity.feeds(3)
    decoder_parity.assert_close(decoder_parity.onnx(onnx_model, feeds), decoder_parity.torch(torch_model, feeds))


def _apply_factors_in_torch(torch_model, factors):
    import torch

    with torch.no_grad():
        for module, (a, b) in factors.items():
            torch_model.get_submodule(module).weight.copy_(torch.from_numpy(b @ a))


def test_low_rank_llama_matches_torch_with_the_same_factors(fresh_torch_and_onnx, decoder_parity, factors_for):
    torch_model, onnx_model = fresh_torch_and_onnx
    factors = factors_for(torch_model, LAYER_1 + ["model.layers.2.self_attn.q_proj"], rank=4)

    split = SplitLowRankPass(factors)
    split_result = split(onnx_model)
    _apply_factors_in_torch(torch_model, factors)

    assert split_result.stats.params_after < split_result.stats.params_before
    feeds = decoder_parity.feeds(3)
    decoder_parity.assert_close(decoder_parity.onnx(onnx_model, feeds), decoder_parity.torch(torch_model, feeds))


def test_low_rank_keeps_the_bias_add_of_qwen2(exported_qwen2, decoder_parity, factors_for):
    import copy

    torch_model = copy.deepcopy(exported_qwen2[0])
    onnx_model = ir.load(exported_qwen2[1])
    factors = factors_for(torch_model, ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"], rank=3)
    adds_before = sum(node.op_type == "Add" for node in onnx_model.graph)

    SplitLowRankPass(factors)(onnx_model)
    _apply_factors_in_torch(torch_model, factors)

    assert sum(node.op_type == "Add" for node in onnx_model.graph) == adds_before
    feeds = decoder_parity.feeds(3)
    decoder_parity.assert_close(decoder_parity.onnx(onnx_model, feeds), decoder_parity.torch(torch_model, feeds))


def test_a_new_bias_replaces_the_graph_bias_of_qwen2(exported_qwen2, decoder_parity, factors_for):
    import copy

    import torch

    torch_model = copy.deepcopy(exported_qwen2[0])
    onnx_model = ir.load(exported_qwen2[1])
    module = "model.layers.1.self_attn.k_proj"
    a, b = factors_for(torch_model, [module], rank=2)[module]
    bias = torch_model.get_submodule(module).bias.detach().numpy() + 0.25

    SplitLowRankPass({module: (a, b, bias)})(onnx_model)
    _apply_factors_in_torch(torch_model, {module: (a, b)})
    with torch.no_grad():
        torch_model.get_submodule(module).bias.copy_(torch.from_numpy(bias))

    feeds = decoder_parity.feeds(3)
    decoder_parity.assert_close(decoder_parity.onnx(onnx_model, feeds), decoder_parity.torch(torch_model, feeds))


@pytest.mark.parametrize(
    ("bias", "message"),
    [(np.ones(4, dtype=np.float32), "has none in the graph"), (np.ones(3, dtype=np.float32), "expected \\(4,\\)")],
)
def test_bad_biases_are_user_errors(toy_decoder, bias, message):
    a, b = _factors(2)
    with pytest.raises(EdgeCompressError, match=message):
        SplitLowRankPass({"model.layers.0.self_attn.q_proj": (a, b, bias)})(toy_decoder([0]))


def _single_linear_graph(form: str, weight: np.ndarray, bias: np.ndarray) -> ir.Model:
    """y = x Wᵀ + b as the exporter may write it: Gemm(transB=1), or MatMul over a Transpose node."""
    from edgecompress.passes.layer_map import CLASS_HIERARCHY_KEY, NAME_SCOPES_KEY

    def initializer(name, array):
        tensor = ir.tensor(array, name=name)
        return ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)

    classes = ["Net", LINEAR_CLASS, "aten.linear"]
    meta = {NAME_SCOPES_KEY: repr(["", "fc", "linear"]), CLASS_HIERARCHY_KEY: repr(classes)}
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, weight.shape[1]]))
    w, b = initializer("fc.weight", weight), initializer("fc.bias", bias)
    if form == "gemm":
        nodes = [ir.node("Gemm", [x, w, b], {"transB": 1}, metadata_props=dict(meta))]
    else:
        transpose = ir.node("Transpose", [w], {"perm": [1, 0]}, metadata_props=dict(meta))
        matmul = ir.node("MatMul", [x, transpose.outputs[0]], metadata_props=dict(meta))
        nodes = [transpose, matmul, ir.node("Add", [matmul.outputs[0], b], metadata_props=dict(meta))]
    y = nodes[-1].outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([2, weight.shape[0]])
    graph = ir.Graph([x], [y], nodes=nodes, initializers=[w, b], opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("form", ["gemm", "matmul_over_transpose"])
def test_other_linear_forms_split_exactly(form):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    a, b = rng.standard_normal((2, 5)).astype(np.float32), rng.standard_normal((3, 2)).astype(np.float32)
    new_bias = bias + 1.0
    model = _single_linear_graph(form, weight, bias)

    SplitLowRankPass({"fc": (a, b, new_bias)})(model)

    assert "fc.weight" not in model.graph.initializers and "fc.bias" not in model.graph.initializers
    assert not any(node.op_type == "Transpose" for node in model.graph)
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())
    x = rng.standard_normal((2, 5)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ (b @ a).T + new_bias, atol=1e-5)
