"""PackProjectionsPass: projections reading one input become one matmul (packed QKV, or a Split), same outputs."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from edgecompress.passes.fuse_group_query_attention import FuseGroupQueryAttentionPass
from edgecompress.passes.fuse_ort_ops import FuseOrtOpsPass
from edgecompress.passes.pack_projections import PackProjectionsPass
from edgecompress.passes.quantize_weights import QuantizeWeightsPass

LAYERS = 3


def _fused(exported, bits: int | None = None, rotary: bool = False) -> ir.Model:
    from edgecompress.export import rotary_caches

    model = ir.load(exported[1])
    if bits:
        QuantizeWeightsPass(bits, 32)(model)
    FuseOrtOpsPass()(model)
    FuseGroupQueryAttentionPass(rotary_caches(exported[0]) if rotary else None)(model)
    return model


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


def _check_packed(exported, decoder_parity, bits, matmul_op, head_dim=16):
    """With rotary inside attention q/k/v go to GroupQueryAttention packed; with it outside they are split."""
    rotary = head_dim == 16
    reference, model = _fused(exported, bits, rotary), _fused(exported, bits, rotary)
    before = _ops(model)[matmul_op]
    result = PackProjectionsPass()(model)
    assert result.modified and result.stats.projections_packed == 5 * LAYERS  # q, k, v and gate, up
    assert (result.stats.qkv_packed, result.stats.groups_split) == ((LAYERS, LAYERS) if rotary else (0, 2 * LAYERS))
    assert _ops(model)[matmul_op] == before - 3 * LAYERS
    assert _ops(model)["Split"] == (LAYERS if rotary else 2 * LAYERS)
    for node in model.graph:
        if node.op_type == "GroupQueryAttention" and rotary:  # packed QKV: key and value empty
            assert node.inputs[1] is None and node.inputs[2] is None
            assert node.inputs[0].producer().op_type == matmul_op
    feeds = decoder_parity.feeds(num_layers=LAYERS, head_dim=head_dim)
    continuation = {name: value[:1] for name, value in feeds.items()}
    decode = {name: value[:, -1:] if name in ("input_ids", "position_ids") else value for name, value in feeds.items()}
    decode["attention_mask"] = feeds["attention_mask"][:, :5]
    decode["position_ids"] = np.full((2, 1), 4, np.int64)
    for step in (continuation, decode):
        decoder_parity.assert_close(decoder_parity.onnx(model, step), decoder_parity.onnx(reference, step), atol=1e-5)


def test_fp32_projections_pack_into_the_attentions_packed_qkv(exported_llama_head16, decoder_parity):
    _check_packed(exported_llama_head16, decoder_parity, None, "MatMul")


def test_int4_projections_pack_into_one_matmul_nbits(exported_llama_head16, decoder_parity):
    _check_packed(exported_llama_head16, decoder_parity, 4, "MatMulNBits")


def test_with_rotary_outside_the_projections_are_split(exported_llama, decoder_parity):
    _check_packed(exported_llama, decoder_parity, 4, "MatMulNBits", head_dim=8)


def test_qwen2_biases_pack_with_their_projections(exported_qwen2, decoder_parity):
    reference, model = _fused(exported_qwen2), _fused(exported_qwen2)  # head_dim 8: rotary outside, q/k/v split
    result = PackProjectionsPass()(model)
    assert result.stats.groups_split == 2 * LAYERS and result.stats.projections_packed == 5 * LAYERS
    splits = [node for node in model.graph if node.op_type == "Split"]
    assert sum(split.inputs[0].producer().op_type == "Add" for split in splits) == LAYERS  # q/k/v biases, packed
    step = {name: value[:1] for name, value in decoder_parity.feeds(num_layers=LAYERS).items()}
    decoder_parity.assert_close(decoder_parity.onnx(model, step), decoder_parity.onnx(reference, step), atol=1e-5)


def test_a_weight_shared_by_two_projections_is_left_alone():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 4]))
    weight = ir.Value(name="w", const_value=ir.tensor(np.ones((4, 3), np.float32)),
                      type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4, 3]))
    first, second = ir.node("MatMul", [x, weight], name="a"), ir.node("MatMul", [x, weight], name="b")
    add = ir.node("Add", [first.outputs[0], second.outputs[0]], name="sum")
    graph = ir.Graph([x], [add.outputs[0]], nodes=[first, second, add], initializers=[weight], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    result = PackProjectionsPass()(model)
    assert not result.modified and result.stats.kept == {"a weight shared by two projections": 1}
    assert len(model.graph) == 3
