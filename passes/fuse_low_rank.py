"""Fuse the MatMul pair SplitLowRankPass writes into one `ai.edgecompress::LowRankMatMul`.

SplitLowRankPass marks its pair with LOW_RANK_FACTOR_KEY: "A" on the inserted MatMul(X, Aᵀ), "B" on
the Linear's own MatMul(·, Bᵀ). Where the target enables LowRankMatMul the pair, with the bias Add
behind it when there is one, becomes LowRankMatMul(X, A, B[, bias]) and the rank-R intermediate never
leaves the kernel. The fused node takes over the last node's output value (name, type, consumers) and
the Linear node's metadata, without the factor mark.

A pair is left as it is, with the reason counted, when a factor is not a float MatMul by an
initializer (quantized to MatMulNBits, a Gemm, a weight computed in the graph), or when the
intermediate has other readers. Ordering: on float weights, before FuseOrtOpsPass (onnxruntime's
fusions do not know the op) and before any weight-format pass (which would quantize the factors);
ConvertFloat16Pass afterwards converts the op's inputs like any other float node's.
"""

from __future__ import annotations

import collections
import dataclasses

import onnx_ir as ir

from edgecompress.kernels.reference import DOMAIN, DOMAIN_VERSION
from edgecompress.passes.graph_edits import StatsResult, check_no_dangling_values, require_unfused
from edgecompress.passes.layer_map import LOW_RANK_FACTOR_KEY

FUSED_OP = "LowRankMatMul"
_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


@dataclasses.dataclass
class FuseLowRankStats:
    fused: int = 0
    with_bias: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> pairs left unfused


class FuseLowRankPass(ir.passes.InPlacePass):
    """Every marked low-rank MatMul pair → one LowRankMatMul node (see the module docstring)."""

    def requires(self, model: ir.Model) -> None:
        require_unfused(model, type(self).__name__)

    def ensures(self, model: ir.Model) -> None:
        check_no_dangling_values(model.graph)

    def call(self, model: ir.Model) -> StatsResult:
        graph = model.graph
        stats = FuseLowRankStats()
        skipped: collections.Counter = collections.Counter()
        for second in [node for node in graph if node.metadata_props.get(LOW_RANK_FACTOR_KEY) == "B"]:
            pair = _pair(second)
            if isinstance(pair, str):
                skipped[pair] += 1
                continue
            first, bias_add = pair
            _fuse(graph, first, second, bias_add)
            stats.fused += 1
            stats.with_bias += bias_add is not None
        if stats.fused:
            graph.opset_imports[DOMAIN] = DOMAIN_VERSION
        stats.skipped = dict(sorted(skipped.items()))
        return StatsResult(model, modified=stats.fused > 0, stats=stats)


def _factor_problem(node: ir.Node, role: str) -> str | None:
    if node.op_type != "MatMul" or node.domain != "":
        if node.op_type == "MatMulNBits":
            return f"factor {role} quantized to MatMulNBits"
        return f"factor {role} is a {node.op_type}, not a MatMul"
    weight = node.inputs[1]
    if weight is None or not weight.is_initializer() or weight.const_value is None or len(weight.shape) != 2:
        return f"factor {role}'s weight is not a 2-D initializer"
    if weight.dtype not in _FLOAT_TYPES:
        return f"factor {role}'s weight is {weight.dtype.name}, not float"
    return None


def _pair(second: ir.Node) -> tuple[ir.Node, ir.Node | None] | str:
    """(first MatMul, bias Add or None) of a fusable pair, or why it is not fusable."""
    problem = _factor_problem(second, "B")
    if problem:
        return problem
    intermediate = second.inputs[0]
    first = intermediate.producer() if intermediate is not None else None
    if first is None or first.metadata_props.get(LOW_RANK_FACTOR_KEY) != "A":
        return "factor B does not read a factor A"
    problem = _factor_problem(first, "A")
    if problem:
        return problem
    if len(intermediate.uses()) != 1 or intermediate.is_graph_output():
        return "the rank-R intermediate has other readers"
    if first.inputs[1].dtype != second.inputs[1].dtype:
        return "factors A and B have different dtypes"
    return first, _bias_add(second)


def _bias_add(second: ir.Node) -> ir.Node | None:
    """The Add of a [N] initializer right behind the pair, when the pair's output has no other reader."""
    out = second.outputs[0]
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output() or uses[0].node.op_type != "Add" or uses[0].node.domain != "":
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    n = second.inputs[1].shape[1]
    if other is None or not other.is_initializer() or tuple(other.shape or ()) != (n,):
        return None
    return add if other.dtype == second.inputs[1].dtype else None


def _fuse(graph: ir.Graph, first: ir.Node, second: ir.Node, bias_add: ir.Node | None) -> None:
    last = bias_add or second
    inputs = [first.inputs[0], first.inputs[1], second.inputs[1]]
    if bias_add is not None:
        inputs.append(next(v for v in bias_add.inputs if v is not second.outputs[0]))
    metadata = {key: value for key, value in second.metadata_props.items() if key != LOW_RANK_FACTOR_KEY}
    fused = ir.node(FUSED_OP, inputs, domain=DOMAIN, name=f"{second.name}_low_rank", metadata_props=metadata)
    old = last.outputs[0]
    name, shape, type_ = old.name, old.shape, old.type
    graph.insert_before(last, fused)
    old.replace_all_uses_with(fused.outputs[0], replace_graph_outputs=True)
    graph.remove([node for node in (first, second, bias_add) if node is not None], safe=True)
    out = fused.outputs[0]
    out.name, out.shape, out.type = name, shape, type_
