"""RemoveIdentityExpandsPass: an Expand to the shape its input already has is dropped, anything unproven stays."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from edgecompress.passes.fuse_group_query_attention import FuseGroupQueryAttentionPass
from edgecompress.passes.fuse_ort_ops import FuseOrtOpsPass
from edgecompress.passes.remove_identity_expands import RemoveIdentityExpandsPass


def _graph(target_dim: str, const_target=None) -> ir.Model:
    """ids [batch, seq]; mask [batch, 1, seq, total]; out = Expand(mask, Concat(1, 1, Shape(ids)[1:2], 1)) + 0,
    or Expand(mask, const_target) when given; `target_dim`: the symbolic name of ids' second dim."""
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", target_dim]))
    mask = ir.Value(name="mask", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 1, "seq", "total"]))
    one = ir.Value(name="one", const_value=ir.tensor(np.array([1], np.int64)), type=ir.TensorType(ir.DataType.INT64),
                   shape=ir.Shape([1]))
    nodes = []
    if const_target is None:
        seq = ir.node("Shape", [ids], attributes={"start": 1, "end": 2}, name="seq_len")
        concat = ir.node("Concat", [one, one, seq.outputs[0], one], attributes={"axis": 0}, name="target")
        nodes += [seq, concat]
        target = concat.outputs[0]
    else:
        target = ir.Value(name="target", const_value=ir.tensor(np.array(const_target, np.int64)),
                          type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([len(const_target)]))
    expand = ir.node("Expand", [mask, target], name="expand")
    zero = ir.Value(name="zero", const_value=ir.tensor(np.array(0, np.float32)), type=ir.TensorType(ir.DataType.FLOAT),
                    shape=ir.Shape([]))
    add = ir.node("Add", [expand.outputs[0], zero], name="add")
    add.outputs[0].name = "out"
    initializers = [one, zero] + ([target] if const_target is not None else [])
    graph = ir.Graph([ids, mask], [add.outputs[0]], nodes=[*nodes, expand, add], initializers=initializers,
                     opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


def test_an_expand_to_the_masks_own_shape_goes_with_its_shape_arithmetic():
    model = _graph("seq")
    result = RemoveIdentityExpandsPass()(model)
    assert result.modified and result.stats.removed == 1 and not result.stats.kept
    assert _ops(model) == {"Add": 1}  # Shape and Concat were only the Expand's target
    add = next(iter(model.graph))
    assert add.inputs[0].name == "mask"


def test_unproven_targets_stay():
    other_name = _graph("other")  # ids' length is not provably the mask's
    broadcast = _graph("seq", const_target=[1, 1, 1, 4])  # really broadcasts (total vs 4)
    for model, reason in ((other_name, "not provably"), (broadcast, "not provably")):
        nodes = len(model.graph)
        result = RemoveIdentityExpandsPass()(model)
        assert not result.modified and len(model.graph) == nodes
        assert any(reason in kept for kept in result.stats.kept)


def test_the_exported_attention_bias_copies_go_and_outputs_stay(exported_llama, decoder_parity):
    reference = ir.load(exported_llama[1])
    model = ir.load(exported_llama[1])
    for fused in (reference, model):
        FuseOrtOpsPass()(fused)
        FuseGroupQueryAttentionPass()(fused)
    expands = _ops(model)["Expand"]
    result = RemoveIdentityExpandsPass()(model)
    assert result.stats.removed == 3 and _ops(model)["Expand"] == expands - 3  # one attention bias per layer
    feeds = decoder_parity.feeds(num_layers=3)
    step = {name: value[:1] for name, value in feeds.items()}
    decoder_parity.assert_close(decoder_parity.onnx(model, step), decoder_parity.onnx(reference, step), atol=0)
