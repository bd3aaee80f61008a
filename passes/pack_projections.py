"""Pack the projections that read the same input into one matmul: q/k/v into GroupQueryAttention's packed QKV,
gate/up (or any other siblings) into one matmul and a Split.

At decode a projection multiplies one row, so each MatMulNBits costs about a launch plus its weights' bytes, and
small ones stream those bytes slowly (the profile's attention projections ran at 4 GB/s against 10 for the MLP).
Concatenating siblings' weights along N is exact for every form the build writes:
- `MatMul(x, W)`, W a constant [K, N]: W concatenated on axis 1;
- `MatMulNBits(x, B, scales[, zero_points])`: B [N, blocks, blob], scales and zero points (row-major by N)
  concatenated on axis 0; K, bits, block_size and accuracy_level must match;
- the exact Q4_1 form `Add(MatMulNBits(x, ...), MatMul(block_sums(x), mins_t))` (MapGgufWeightsPass): the mins
  [blocks, N] concatenated on axis 1, the block sums shared;
each optionally followed by `Add(·, bias)` with a constant bias [N] (Qwen2's q/k/v), biases concatenated.
Siblings are grouped by input and form (settings included). Where a group's three outputs are one
GroupQueryAttention's query, key and value, the op takes the packed tensor (its packed-QKV form, in q, k, v
order); other groups get a Split on the last axis. A projection read by a graph output, or a weight shared by two
projections, stays unpacked (the reason is counted).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from edgecompress.passes.graph_edits import StatsResult, add_initializer, check_no_dangling_values

_NBITS_ATTRIBUTES = ("K", "bits", "block_size", "accuracy_level")


@dataclasses.dataclass
class PackProjectionsStats:
    qkv_packed: int = 0  # GroupQueryAttention nodes now reading one packed projection
    groups_split: int = 0  # other sibling groups packed and split
    projections_packed: int = 0
    kept: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> sibling groups left alone


@dataclasses.dataclass
class Projection:
    """y = x·W [+ block_sums(x)·mins] [+ bias], recognised from the graph."""

    output: ir.Value  # the projection's final value (after the mins and bias adds)
    matmul: ir.Node  # MatMul or MatMulNBits
    width: int  # N
    mins: ir.Node | None = None  # MatMul(block_sums, mins_t)
    mins_add: ir.Node | None = None
    bias_add: ir.Node | None = None

    def key(self) -> tuple:
        """What siblings must share to be packed: the form and the quantization settings."""
        node = self.matmul
        settings = tuple(node.attributes.get_int(name, -1) for name in _NBITS_ATTRIBUTES) \
            if node.op_type == "MatMulNBits" else ()
        block_sums = self.mins.inputs[0] if self.mins is not None else None
        return (node.op_type, len(node.inputs), settings, block_sums, self.bias_add is not None)


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    return value.const_value.numpy()


def _single_use(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and not value.is_graph_output() else None


def _other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    if len(node.inputs) != 2:
        return None
    return node.inputs[1] if node.inputs[0] is value else node.inputs[0] if node.inputs[1] is value else None


def as_projection(node: ir.Node) -> Projection | None:
    """The projection `node` starts (a MatMul with a constant weight or a MatMulNBits), else None."""
    if node.domain == "" and node.op_type == "MatMul":
        weight = _constant(node.inputs[1])
        if weight is None or weight.ndim != 2:
            return None
        projection = Projection(node.outputs[0], node, int(weight.shape[1]))
    elif node.domain == "com.microsoft" and node.op_type == "MatMulNBits" and 3 <= len(node.inputs) <= 4:
        if any(_constant(value) is None for value in node.inputs[1:]):
            return None
        projection = Projection(node.outputs[0], node, node.attributes.get_int("N"))
    else:
        return None
    after = _single_use(projection.output)
    if after is not None and after.op_type == "Add" and node.op_type == "MatMulNBits":
        mins = _other_input(after, projection.output)
        producer = mins.producer() if mins is not None else None
        if producer is not None and producer.op_type == "MatMul" and _single_use(mins) is after:
            table = _constant(producer.inputs[1])
            if table is not None and table.ndim == 2 and table.shape[1] == projection.width:
                projection.mins, projection.mins_add, projection.output = producer, after, after.outputs[0]
                after = _single_use(projection.output)
    if after is not None and after.op_type == "Add":
        bias = _constant(_other_input(after, projection.output))
        if bias is not None and bias.shape == (projection.width,):
            projection.bias_add, projection.output = after, after.outputs[0]
    if projection.output.is_graph_output():
        return None
    return projection


def _concat(graph: ir.Graph, values: list[ir.Value], axis: int, name: str) -> ir.Value:
    return add_initializer(graph, name, np.concatenate([_constant(v) for v in values], axis=axis))


class PackProjectionsPass(ir.passes.InPlacePass):
    """Sibling projections of one input → one matmul (GroupQueryAttention's packed QKV, else a Split)."""

    def ensures(self, model: ir.Model) -> None:
        check_no_dangling_values(model.graph)

    def call(self, model: ir.Model) -> StatsResult:
        graph = model.graph
        stats = PackProjectionsStats()
        for group in self._sibling_groups(graph, stats):
            self._pack(graph, group, stats)
        modified = stats.qkv_packed + stats.groups_split > 0
        if modified:
            ir.passes.common.RemoveUnusedNodesPass()(model)  # the old matmuls and their weights
            graph.sort()  # the packed nodes went in beside one sibling; their inputs may come later
        return StatsResult(model, modified=modified, stats=stats)

    def _sibling_groups(self, graph: ir.Graph, stats: PackProjectionsStats) -> list[list[Projection]]:
        """Projections of one input and one form (a block-sum MatMul beside q/k/v is a group of its own)."""
        groups: dict[tuple, list[Projection]] = collections.defaultdict(list)
        projections = [p for p in map(as_projection, graph) if p is not None]
        in_chains = {id(p.mins) for p in projections if p.mins is not None}  # a mins MatMul is part of its chain
        for projection in projections:
            if id(projection.matmul) not in in_chains:
                groups[(id(projection.matmul.inputs[0]), projection.key())].append(projection)
        chosen = []
        for projections in groups.values():
            weights = {id(p.matmul.inputs[1]) for p in projections}
            if len(projections) < 2:
                continue
            if len(weights) != len(projections):
                reason = "a weight shared by two projections"
                stats.kept[reason] = stats.kept.get(reason, 0) + 1
                continue
            chosen.append(projections)
        return chosen

    def _pack(self, graph: ir.Graph, group: list[Projection], stats: PackProjectionsStats) -> None:
        attention = self._qkv_reader(group)
        if attention is not None:
            order = {id(attention.inputs[i]): i for i in range(3)}
            group = sorted(group, key=lambda p: order[id(p.output)])
        first = group[0]
        name = (first.matmul.name or "projection") + "_packed"
        packed = self._packed_output(graph, group, name)
        if attention is not None:
            attention.replace_input_with(0, packed)
            attention.replace_input_with(1, None)
            attention.replace_input_with(2, None)
            stats.qkv_packed += 1
        else:
            widths = add_initializer(graph, f"{name}_widths", np.array([p.width for p in group], np.int64))
            split = ir.node("Split", [packed, widths], attributes={"axis": -1}, num_outputs=len(group),
                            name=f"{name}_split")
            graph.insert_after(packed.producer(), split)
            for projection, output in zip(group, split.outputs):
                output.shape, output.type = projection.output.shape, projection.output.type
                projection.output.replace_all_uses_with(output)
            stats.groups_split += 1
        stats.projections_packed += len(group)

    def _qkv_reader(self, group: list[Projection]) -> ir.Node | None:
        """The GroupQueryAttention reading exactly these three outputs as its query, key and value."""
        if len(group) != 3 or any(_single_use(p.output) is None for p in group):
            return None
        node = _single_use(group[0].output)
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            return None
        if {id(node.inputs[i]) for i in range(3)} != {id(p.output) for p in group}:
            return None
        return node

    def _packed_output(self, graph: ir.Graph, group: list[Projection], name: str) -> ir.Value:
        """One matmul (and mins / bias adds) computing every projection of `group`, side by side on the last axis."""
        first = group[0]
        x = first.matmul.inputs[0]
        width = sum(p.width for p in group)
        if first.matmul.op_type == "MatMul":
            node = ir.node("MatMul", [x, _concat(graph, [p.matmul.inputs[1] for p in group], 1, f"{name}_weight")],
                           name=name)
        else:
            weights = [_concat(graph, [p.matmul.inputs[i] for p in group], 0, f"{name}_{i}")
                       for i in range(1, len(first.matmul.inputs))]
            attributes = {key: value for key, value in first.matmul.attributes.items()}
            attributes["N"] = ir.AttrInt64("N", width)
            node = ir.node("MatMulNBits", [x, *weights], attributes=attributes, domain="com.microsoft", name=name)
        graph.insert_before(first.matmul, node)
        output = node.outputs[0]
        if first.mins is not None:
            mins = ir.node("MatMul", [first.mins.inputs[0], _concat(graph, [p.mins.inputs[1] for p in group], 1,
                                                                          f"{name}_mins")], name=f"{name}_mins")
            add = ir.node("Add", [output, mins.outputs[0]], name=f"{name}_add_mins")
            graph.insert_after(node, [mins, add])
            output = add.outputs[0]
        if first.bias_add is not None:
            biases = [next(v for v in p.bias_add.inputs if _constant(v) is not None) for p in group]
            add = ir.node("Add", [output, _concat(graph, biases, 0, f"{name}_bias")], name=f"{name}_bias")
            graph.insert_after(output.producer(), add)
            output = add.outputs[0]
        shape = first.output.shape
        output.type = first.output.type
        output.shape = ir.Shape([*shape.dims[:-1], width]) if shape is not None else None
        return output
