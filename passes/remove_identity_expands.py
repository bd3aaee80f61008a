"""Drop Expand nodes that broadcast a tensor to the shape it already has, proven from symbolic dims.

The exporter sizes every layer's attention bias with `Expand(mask, Concat(1, 1, Shape(q)[2:3], 1))`: the mask is
already [batch, 1, sequence_length, total_sequence_length], so each Expand only copies it (per layer, per step,
plus the Shape and Concat that build its target). onnxscript's `ExpandIdentity` rule needs a constant target;
this pass reads a dynamic one: a Concat (axis 0) of constant ints and `Shape(v, start, end)` slices, each dim
compared with the input's dim on the same axis, where a target dim of 1 keeps the input's dim and a dim read
from another value's shape must carry the same symbolic name (or the same number) as the input's. Anything
unproven stays. Runs on any graph; it changes no value, only removes copies.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import onnx_ir.passes.common

from edgecompress.passes.graph_edits import StatsResult, check_no_dangling_values, constant_ints, shape_range


@dataclasses.dataclass
class RemoveIdentityExpandsStats:
    removed: int = 0
    kept: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> Expand nodes left


def _shape_slice_dims(value: ir.Value) -> list | None:
    """The dims Shape(v, start, end) reads, from v's (symbolic) shape; None when unknown."""
    node = value.producer()
    if node is None or node.op_type != "Shape" or node.domain or node.inputs[0] is None:
        return None
    source = node.inputs[0].shape
    if source is None:
        return None
    start, end = shape_range(node)
    return list(source.dims[start:end])


def target_dims(shape: ir.Value) -> list | None:
    """Each dim of an Expand target: an int, a symbolic dim, or None (unknown); None when unreadable."""
    ints = constant_ints(shape)
    if ints is not None:
        return ints
    concat = shape.producer()
    if concat is None or concat.op_type != "Concat" or concat.domain or concat.attributes.get_int("axis", 0) != 0:
        return None
    dims: list = []
    for part in concat.inputs:
        read = constant_ints(part)
        read = read if read is not None else (_shape_slice_dims(part) if part is not None else None)
        if read is None:
            return None
        dims += read
    return dims


def _same_dim(target, dim) -> bool:
    if isinstance(target, int):
        return target == 1 or (isinstance(dim, int) and target == dim)
    return isinstance(target, ir.SymbolicDim) and isinstance(dim, ir.SymbolicDim) and \
        target.value is not None and target.value == dim.value


def identity_problem(node: ir.Node) -> str | None:
    """None when the Expand provably returns its input unchanged, else why it is kept."""
    x, shape = node.inputs[0], node.inputs[1]
    if x is None or x.shape is None or shape is None:
        return "input shape unknown"
    if node.outputs[0].is_graph_output():
        return "a graph output"
    dims = target_dims(shape)
    if dims is None:
        return "target not built from constants and Shape slices"
    if len(dims) != len(x.shape):
        return "target of another rank"
    if not all(_same_dim(target, dim) for target, dim in zip(dims, x.shape.dims)):
        return "target dims not provably the input's"
    return None


class RemoveIdentityExpandsPass(ir.passes.InPlacePass):
    """Expand(x, shape) → x where the target provably broadcasts to x's own shape."""

    def ensures(self, model: ir.Model) -> None:
        check_no_dangling_values(model.graph)

    def call(self, model: ir.Model) -> StatsResult:
        graph = model.graph
        stats = RemoveIdentityExpandsStats()
        for node in [n for n in graph if n.op_type == "Expand" and not n.domain]:
            reason = identity_problem(node)
            if reason:
                stats.kept[reason] = stats.kept.get(reason, 0) + 1
                continue
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            graph.remove(node, safe=True)
            stats.removed += 1
        if stats.removed:
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return StatsResult(model, modified=stats.removed > 0, stats=stats)
