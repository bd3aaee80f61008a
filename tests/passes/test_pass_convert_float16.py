"""ConvertFloat16Pass: what becomes fp16, what stays fp32 and why, on a hand-built graph and a tiny
exported Llama (fused first, as the build does)."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

from edgecompress.passes import (
    ConvertFloat16Pass,
    FuseGroupQueryAttentionPass,
    FuseOrtOpsPass,
    PassInputError,
    QuantizeWeightsPass,
    convert_float16,
)
from edgecompress.passes.convert_float16 import fp32_required_nodes, lm_head_nodes

LAYERS = 3
F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16


def _value(name, dtype=F32, shape=(2, 8)):
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))


def _const(name, array):
    tensor = ir.tensor(np.asarray(array, np.float32), name=name)
    return ir.Value(name=name, type=ir.TensorType(F32), shape=tensor.shape, const_value=tensor)


def _norm_and_softmax_model() -> ir.Model:
    """An unfused RMSNorm, then x·xᵀ scores through a scale and a Softmax: what fusion may leave."""
    x = _value("x")
    two, eps, scale = _const("two", 2.0), _const("eps", 1e-6), _const("scale", 0.125)
    axes = ir.Value(name="axes", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]),
                    const_value=ir.tensor(np.array([-1], np.int64), name="axes"))
    square = ir.node("Pow", [x, two], name="square")
    mean = ir.node("ReduceMean", [square.outputs[0], axes], name="mean")
    plus = ir.node("Add", [mean.outputs[0], eps], name="plus_eps")
    root = ir.node("Sqrt", [plus.outputs[0]], name="root")
    normed = ir.node("Div", [x, root.outputs[0]], name="normed")
    transposed = ir.node("Transpose", [normed.outputs[0]], {"perm": [1, 0]}, name="key_t")
    scores = ir.node("MatMul", [normed.outputs[0], transposed.outputs[0]], name="scores")
    scaled = ir.node("Mul", [scores.outputs[0], scale], name="scaled")
    probs = ir.node("Softmax", [scaled.outputs[0]], {"axis": -1}, name="probs")
    context = ir.node("MatMul", [probs.outputs[0], normed.outputs[0]], name="context")
    nodes = [square, mean, plus, root, normed, transposed, scores, scaled, probs, context]
    for node in nodes:
        node.outputs[0].name, node.outputs[0].dtype = f"{node.name}_out", F32
    context.outputs[0].name = "logits"
    graph = ir.Graph([x], [context.outputs[0]], nodes=nodes, initializers=[two, eps, scale, axes],
                     opset_imports={"": 18}, name="norm_softmax")
    return ir.Model(graph, ir_version=10)


def test_unfused_norm_and_attention_stay_fp32():
    model = _norm_and_softmax_model()
    required = fp32_required_nodes(model.graph)
    assert set(required) == {"square", "mean", "plus_eps", "root", "scores", "scaled", "probs"}
    assert required["square"].startswith("unfused norm") and required["scores"].startswith("unfused attention")

    result = ConvertFloat16Pass(keep_io=("x", "logits"))(model)

    dtypes = {node.name: node.outputs[0].dtype for node in model.graph}
    for name in ("square", "mean", "plus_eps", "root", "scores", "scaled", "probs"):
        assert dtypes[name] == F32, name
    for name in ("normed", "key_t", "context"):  # the rest computes in fp16
        assert dtypes[name] == F16, name
    assert result.stats.nodes_blocked == 7 and result.stats.nodes_converted == 3
    assert result.stats.blocked_by_reason["unfused norm: variance"] == 2
    # A run of blocked nodes is not stored fp16 between them: no Cast to fp16 reads x² or the scores.
    cast_inputs = {node.inputs[0].name for node in model.graph
                   if node.op_type == "Cast" and node.attributes.get_int("to") == F16}
    assert not cast_inputs & {"square_out", "mean_out", "scores_out", "scaled_out"}


def _fused_tiny(path) -> ir.Model:
    model = ir.load(path)
    FuseOrtOpsPass()(model)
    FuseGroupQueryAttentionPass()(model)
    return model


def test_fused_llama_converts_with_fp16_cache_and_fp32_logits(exported_llama, decoder_parity):
    model = _fused_tiny(exported_llama[1])
    # One row: GroupQueryAttention refuses several new tokens over a cache in a batch of two.
    feeds = {name: array[:1] for name, array in decoder_parity.feeds(num_layers=LAYERS).items()}
    reference = decoder_parity.onnx(model, feeds)

    result = ConvertFloat16Pass()(model)

    io = {value.name: value.dtype for value in (*model.graph.inputs, *model.graph.outputs)}
    assert io["logits"] == F32 and result.stats.io_kept_fp32 == ["logits"]
    assert all(dtype == F16 for name, dtype in io.items() if name.startswith(("past_key_values.", "present.")))
    # cos/sin from positions stay fp32 (fp16 holds integers exactly only up to 2048).
    assert all(node.outputs[0].dtype == F32 for node in model.graph if node.op_type in ("Cos", "Sin"))
    assert result.stats.blocked_by_reason["rotary cos/sin (positions in fp32)"] >= 4
    ops = collections.Counter((node.op_type, node.outputs[0].dtype) for node in model.graph)
    assert ops[("GroupQueryAttention", F16)] == LAYERS
    assert ops[("SkipSimplifiedLayerNormalization", F16)] == 2 * LAYERS
    assert result.stats.initializers_converted > 0
    assert result.stats.initializers_clamped == 1  # the mask's finfo(float32).min, now -65504

    half_feeds = {name: (array.astype(np.float16) if name.startswith("past") else array)
                  for name, array in feeds.items()}
    converted = decoder_parity.onnx(model, half_feeds)
    assert converted["logits"].dtype == np.float32 and converted["present.0.key"].dtype == np.float16
    np.testing.assert_allclose(converted["logits"], reference["logits"], atol=0.05, rtol=0)


def test_lm_head_block_keeps_the_logits_fp32_end_to_end(exported_llama):
    model = _fused_tiny(exported_llama[1])
    head = [node.name for node in lm_head_nodes(model.graph)]
    assert head and model.graph.node(head[-1]).op_type in ("MatMul", "FusedMatMul")

    result = ConvertFloat16Pass(node_block_list={name: "lm_head" for name in head})(model)

    assert result.stats.blocked_by_reason["lm_head"] == len(head)
    logits = next(value for value in model.graph.outputs if value.name == "logits")
    assert logits.producer().name == head[0]  # no fp16 round trip between the lm_head and the output
    assert result.stats.round_trips_removed == 1


def test_int4_weights_convert_too(exported_llama, decoder_parity):
    """onnxruntime's converter handles MatMulNBits: its scales become fp16, the packed codes stay."""
    model = ir.load(exported_llama[1])
    QuantizeWeightsPass(bits=4, block_size=32, accuracy_level=4)(model)
    FuseOrtOpsPass()(model)
    ConvertFloat16Pass()(model)
    nbits = [node for node in model.graph if node.op_type == "MatMulNBits"]
    assert len(nbits) == 7 * LAYERS + 1 and all(node.inputs[2].dtype == F16 for node in nbits)
    feeds = {name: array[:1] for name, array in decoder_parity.feeds(num_layers=LAYERS).items()}
    feeds = {name: (array.astype(np.float16) if name.startswith("past") else array) for name, array in feeds.items()}
    assert np.isfinite(decoder_parity.onnx(model, feeds)["logits"]).all()


def test_bfloat16_takes_weights_from_fp32(exported_llama):
    model = _fused_tiny(exported_llama[1])
    ir.external_data.load_to_model(model)
    fp32 = {name: value.const_value.numpy().copy() for name, value in model.graph.initializers.items()
            if value.dtype == F32}

    ConvertFloat16Pass(half="bfloat16")(model)

    import ml_dtypes

    half = {name: value for name, value in model.graph.initializers.items() if value.dtype == ir.DataType.BFLOAT16}
    assert half and not any(v.dtype == F16 for v in model.graph.initializers.values())
    for name, value in half.items():
        np.testing.assert_array_equal(value.const_value.numpy(), fp32[name].astype(ml_dtypes.bfloat16))
    assert all(v.dtype != F16 for node in model.graph for v in node.outputs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"keep_io": ("logitz",)}, "keep_io names 'logitz'"),
    ({"node_block_list": ("no_such_node",)}, "node block list names 'no_such_node'"),
    ({"half": "float8"}, "half precision must be one of"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(PassInputError, match=message):
        ConvertFloat16Pass(**kwargs)(_norm_and_softmax_model())


def test_half_and_oversized_models_are_refused(monkeypatch):
    model = _norm_and_softmax_model()
    ConvertFloat16Pass(keep_io=("x", "logits"))(model)
    with pytest.raises(PassInputError, match="expects an fp32 model"):
        ConvertFloat16Pass(keep_io=("x", "logits"))(model)
    monkeypatch.setattr(convert_float16, "PROTO_LIMIT_BYTES", 8)
    with pytest.raises(PassInputError, match="limited to 2 GB"):
        ConvertFloat16Pass(keep_io=("x", "logits"))(_norm_and_softmax_model())
