"""QuantizeWeightsPass: graph form, packing against a numpy reference, and a tiny exported Llama."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from edgecompress.errors import EdgeCompressError
from edgecompress.passes.quantize_weights import (
    NBitsWeight,
    QuantizeWeightsPass,
    pack_codes,
    quantize_blocks,
)

LINEARS_PER_LAYER = 7


def _matmul_graph(k: int, n: int, transposed_view: bool = False, seed: int = 0) -> tuple[ir.Model, np.ndarray]:
    """y = x · Wᵀ with W [n, k], stored as Wᵀ [k, n] or as W behind a Transpose (tied lm_head form)."""
    weight = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", "seq", k]))
    stored = weight if transposed_view else weight.T.copy()
    init = ir.Value(name="w", shape=ir.Shape(stored.shape), type=ir.TensorType(ir.DataType.FLOAT),
                    const_value=ir.tensor(stored, name="w"))
    nodes = []
    w_input = init
    if transposed_view:
        nodes.append(ir.node("Transpose", [init], {"perm": [1, 0]}, name="t"))
        w_input = nodes[-1].outputs[0]
    nodes.append(ir.node("MatMul", [x, w_input], name="mm"))
    y = nodes[-1].outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["batch", "seq", n])
    graph = ir.Graph([x], [y], nodes=nodes, initializers=[init], opset_imports={"": 18})
    return ir.Model(graph, ir_version=10), weight


def _run(model: ir.Model, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _nbits_from_graph(model: ir.Model) -> tuple[ir.Node, NBitsWeight]:
    """Unpack the MatMulNBits initializers back into codes, the inverse of the pass's packing."""
    (node,) = [n for n in model.graph if n.op_type == "MatMulNBits"]
    attrs = {name: node.attributes.get_int(name) for name in ("K", "N", "bits", "block_size")}
    b = node.inputs[1].const_value.numpy()
    n, n_blocks, _ = b.shape
    if attrs["bits"] == 4:
        codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, -1)
    else:
        codes = b.reshape(n, -1)
    scales = node.inputs[2].const_value.numpy().reshape(n, n_blocks)
    zero_points = None
    if len(node.inputs) > 3:
        packed = node.inputs[3].const_value.numpy().reshape(n, -1)
        zero_points = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n, -1) if attrs["bits"] == 4 else packed
        zero_points = zero_points[:, :n_blocks]
    return node, NBitsWeight(codes, scales, zero_points, attrs["bits"], attrs["block_size"])


@pytest.mark.parametrize("transposed_view", [False, True])
def test_matmul_becomes_one_matmulnbits_with_the_same_output(transposed_view):
    model, _ = _matmul_graph(64, 8, transposed_view)

    result = QuantizeWeightsPass(bits=4, block_size=32, symmetric=False, accuracy_level=4)(model)

    assert result.modified
    assert [n.op_type for n in model.graph] == ["MatMulNBits"]
    node = model.graph.node(0)
    assert node.domain == "com.microsoft" and model.opset_imports["com.microsoft"] == 1
    assert [node.inputs[0].name, node.outputs[0].name] == ["x", "y"] and model.graph.outputs[0] is node.outputs[0]
    assert {k: node.attributes.get_int(k) for k in ("K", "N", "bits", "block_size", "accuracy_level")} == {
        "K": 64, "N": 8, "bits": 4, "block_size": 32, "accuracy_level": 4}
    assert node.inputs[1].const_value.shape == (8, 2, 16)  # [N, n_blocks, blob]
    assert node.inputs[2].const_value.shape == (16,) and node.inputs[3].const_value.shape == (8,)
    assert list(model.graph.initializers) == [v.name for v in node.inputs[1:]]  # the float weight is gone


@pytest.mark.parametrize(
    "bits,block_size,symmetric,k",
    [(4, 32, False, 64), (4, 32, True, 80), (4, 64, False, 96), (4, 128, True, 128), (8, 32, False, 80),
     (8, 128, True, 64)],
)
def test_onnxruntime_matches_the_numpy_dequantized_reference(bits, block_size, symmetric, k):
    n = 12
    model, weight = _matmul_graph(k, n, seed=bits + block_size)
    QuantizeWeightsPass(bits=bits, block_size=block_size, symmetric=symmetric)(model)
    _, nbits = _nbits_from_graph(model)
    x = np.random.default_rng(1).standard_normal((2, 3, k)).astype(np.float32)

    reference = x @ nbits.dequantize(k).T
    got = _run(model, {"x": x})

    np.testing.assert_allclose(got, reference, atol=1e-4, rtol=1e-5)
    # The dequantized weight is a real approximation of the original: error within half a step.
    steps = np.repeat(nbits.scales, block_size, axis=1)[:, :k]
    assert np.all(np.abs(nbits.dequantize(k) - weight) <= 0.5 * steps + 1e-6)


def test_packing_is_low_nibble_first():
    codes = np.array([[1, 2, 3, 4, 15]], dtype=np.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x43, 0x0F]]
    assert pack_codes(codes, 8).tolist() == codes.tolist()


def test_exact_zeros_stay_zero_and_constant_blocks_are_safe():
    weight = np.zeros((2, 64), dtype=np.float32)
    weight[1, :32] = 3.0
    for symmetric in (False, True):
        nbits = quantize_blocks(weight, 4, 32, symmetric)
        np.testing.assert_allclose(nbits.dequantize(64), weight, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"block_size": 48}, {"block_size": 16}, {"bits": 3}, {"accuracy_level": 7}])
def test_unsupported_format_is_a_one_line_error(kwargs):
    with pytest.raises(EdgeCompressError) as error:
        QuantizeWeightsPass(**kwargs)
    assert "\n" not in str(error.value)


def test_counts_low_rank_factors_and_lm_head_switch(toy_decoder):
    rng = np.random.default_rng(0)
    low_rank = {"model.layers.0.mlp.down_proj": (rng.standard_normal((2, 4)), rng.standard_normal((4, 2)))}
    model = toy_decoder([0, 1], low_rank=low_rank)
    quantize = QuantizeWeightsPass(bits=8, block_size=32, include_lm_head=False)

    quantize_result = quantize(model)

    # 2 layers × (q, k, v, o, down) with down split in two in layer 0; lm_head left as MatMul.
    assert quantize_result.stats.matmuls_quantized == 11
    assert quantize_result.stats.lm_head_quantized is False
    assert quantize_result.stats.skipped == {"lm_head excluded": 1}
    assert [n.op_type for n in model.graph].count("MatMul") == 1


def test_tiny_exported_llama_stays_close(exported_llama, decoder_parity):
    model = ir.load(exported_llama[1])
    feeds = decoder_parity.feeds(num_layers=3)
    dense = decoder_parity.onnx(model, feeds)
    quantize = QuantizeWeightsPass(bits=4, block_size=32, accuracy_level=4)

    quantize_result = quantize(model)
    quantized = decoder_parity.onnx(model, feeds)

    assert quantize_result.stats.matmuls_quantized == 3 * LINEARS_PER_LAYER + 1 and quantize_result.stats.lm_head_quantized
    assert not [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    drift = np.abs(quantized["logits"] - dense["logits"]).max() / np.abs(dense["logits"]).max()
    # Random weights give near-flat logits (max |logit| ~0.3), so int4 moves them relatively far:
    # measured 0.20 of the max and 5 of 6 argmaxes kept. Honest bounds, not token equality.
    assert drift < 0.3
    agree = (quantized["logits"].argmax(-1) == dense["logits"].argmax(-1)).mean()
    assert agree >= 0.5
    int8 = QuantizeWeightsPass(bits=8, block_size=32)
    model8 = ir.load(exported_llama[1])
    int8(model8)
    logits8 = decoder_parity.onnx(model8, feeds)["logits"]
    assert np.abs(logits8 - dense["logits"]).max() / np.abs(dense["logits"]).max() < 0.03  # measured 0.008
    assert (logits8.argmax(-1) == dense["logits"].argmax(-1)).all()
