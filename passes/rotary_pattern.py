"""Recognize the exporter's rotary embedding on one projection, for GroupQueryAttention's `do_rotary`.

Hugging Face applies rotary as `x * cos + rotate_half(x) * sin` on the heads view of a projection:

    x = Transpose(Reshape(proj, [B, S, N, D]), perm=[0, 2, 1, 3])                 # BNSH
    rotated = Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, D/2:)), Slice(x, :D/2)), sin))

with cos/sin [B, 1, S, D] built once from position_ids, each half repeating the same D/2 frequencies.
onnxruntime's non-interleaved rotary computes the same from caches [max_positions, D/2], so a match
hands back `proj` (the BSH input GroupQueryAttention rotates itself) and the cos/sin values used.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from edgecompress.passes.graph_edits import constant_ints, shape_range

_BNSH = [0, 2, 1, 3]


@dataclasses.dataclass(frozen=True)
class Rotary:
    rotated: ir.Value  # BNSH, after rotary (what the match started from)
    heads: ir.Value  # BNSH, before rotary
    projection: ir.Value  # BSH [B, S, N*D], before rotary
    cos: ir.Value
    sin: ir.Value
    half: int  # D/2


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and not node.domain else None


def heads_source(bnsh: ir.Value | None) -> ir.Value | None:
    """`proj` when bnsh = Transpose(Reshape(proj), perm=[0, 2, 1, 3]) with proj of rank 3, else None."""
    transpose = _producer(bnsh, "Transpose")
    if transpose is None or list(transpose.attributes.get_ints("perm", [])) != _BNSH:
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    source = reshape.inputs[0] if reshape is not None else None
    if source is None or source.shape is None or len(source.shape) != 3:
        return None
    return source


def _slice_range(node: ir.Node | None, source: ir.Value) -> tuple[int, int] | None:
    """(start, end) of a last-axis, unit-step Slice of `source`."""
    if node is None or node.inputs[0] is not source or len(node.inputs) < 4:
        return None
    starts, ends, axes = (constant_ints(node.inputs[i]) for i in (1, 2, 3))
    steps = constant_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if None in (starts, ends, axes) or len(starts) != 1 or axes[0] not in (-1, 3) or steps != [1]:
        return None
    return starts[0], ends[0]


def _rotate_half(value: ir.Value, source: ir.Value) -> int | None:
    """D/2 when value = Concat(Neg(Slice(source, D/2:)), Slice(source, :D/2)) on the last axis."""
    concat = _producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes.get_int("axis", 0) not in (-1, 3):
        return None
    neg = _producer(concat.inputs[0], "Neg")
    second = _slice_range(_producer(neg.inputs[0], "Slice") if neg else None, source)
    first = _slice_range(_producer(concat.inputs[1], "Slice"), source)
    if first is None or second is None or first[0] != 0 or first[1] <= 0 or second[0] != first[1]:
        return None
    return first[1]


def _scaled(mul: ir.Node | None, source_of) -> tuple[ir.Value, ir.Value] | None:
    """(operand, factor) of a Mul whose operand passes `source_of`, either order."""
    if mul is None:
        return None
    for operand, factor in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        if source_of(operand):
            return operand, factor
    return None


def match_rotary(rotated: ir.Value | None) -> Rotary | None:
    """The rotary applied to `rotated` (BNSH), if it is Hugging Face's half-split form on a projection."""
    add = _producer(rotated, "Add")
    if add is None:
        return None
    for cos_mul, sin_mul in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        plain = _scaled(_producer(cos_mul, "Mul"), lambda v: heads_source(v) is not None)
        if plain is None:
            continue
        x, cos = plain
        turned = _scaled(_producer(sin_mul, "Mul"), lambda v: _rotate_half(v, x) is not None)
        if turned is None:
            continue
        half = _rotate_half(turned[0], x)
        return Rotary(rotated, x, heads_source(x), cos, turned[1], half)
    return None


# Shape(BNSH)[start:end] -> the same dims of input_ids [B, S] (a decoder's queries and new keys are one per input
# token). Not the projection's shape: onnxruntime's optimizer mis-sizes a Shape of a custom op's output
# (ai.edgecompress::LowRankMatMul) once the graph exposes other intermediate outputs (the fp16 activation scan).
_INPUT_IDS_RANGES = {(0, 1): (0, 1), (2, 3): (1, 2)}


def read_shapes_before_rotary(graph: ir.Graph, rotary: Rotary, input_ids: ir.Value | None) -> None:
    """Point the Shape reads of the rotated heads (the export sizes the attention bias from them) at input_ids,
    or at the unrotated heads, so that the rotary ops become dead once the op rotates."""
    for node in list(rotary.rotated.consumers()):
        if node.op_type != "Shape" or node.domain:
            continue
        start, end = shape_range(node)
        source, attributes = rotary.heads, dict(node.attributes)
        if (start, end) in _INPUT_IDS_RANGES and input_ids is not None:
            source = input_ids
            attributes = dict(zip(("start", "end"), _INPUT_IDS_RANGES[start, end]))
        shape = ir.node("Shape", [source], attributes=attributes, name=f"{node.name}_before_rotary")
        graph.insert_before(node, shape)
        node.outputs[0].replace_all_uses_with(shape.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
