"""Replace a Linear by a structured `ai.edgecompress` op: x·Wᵀ becomes MonarchMatMul(x, W1, W2) or
BlastMatMul(x, U, S, V), with the factors in the layouts of `kernels/reference.py`.

The Linear's MatMul is replaced by the op node, which takes over its output value (name, type, consumers)
and its metadata, so a bias Add behind it stays where it is (its bias replaced when the plan gives one).
A Gemm Linear has no separate Add: its bias (the plan's, else its C input) becomes the op's bias input.
The model imports the domain; targets that do not run the op get it lowered by LowerCustomOpsPass.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir

from edgecompress.kernels.reference import BLOCK_SHAPES, DOMAIN, DOMAIN_VERSION, ShapeError
from edgecompress.passes.graph_edits import (
    StatsResult,
    add_initializer,
    check_no_dangling_values,
    drop_if_unused,
    require_unfused,
)
from edgecompress.passes.layer_map import LinearSite, PassInputError, build_layer_map
from edgecompress.passes.split_low_rank import check_bias, set_bias
from edgecompress.structures import STRUCTURES, Structure

# Set on the op node: the structure a Linear was replaced by (the layer map no longer sees it as a Linear).
STRUCTURE_KEY = "edgecompress.structure"

# module -> (structure, factors in the op's input order, bias or None)
StructuredFactors = dict[str, tuple[str, tuple[np.ndarray, ...], np.ndarray | None]]


@dataclasses.dataclass
class SplitStructuredStats:
    ops: dict[str, int] = dataclasses.field(default_factory=dict)  # op -> Linears replaced
    params_before: int = 0  # weights of the replaced Linears
    params_after: int = 0  # their factors


class SplitStructuredPass(ir.passes.InPlacePass):
    """Replace the Linears named in `factors` (full module names) by MonarchMatMul / BlastMatMul nodes."""

    def __init__(self, factors: StructuredFactors):
        super().__init__()
        self.factors = factors

    def requires(self, model: ir.Model) -> None:
        require_unfused(model, type(self).__name__)
        if not self.factors:
            return
        layer_map = build_layer_map(model.graph)
        for module, (structure, arrays, bias) in self.factors.items():
            blocked = [name for name, entry in STRUCTURES.items() if entry.blocked]  # low-rank: SplitLowRankPass
            if structure not in blocked:
                raise PassInputError(f"structure {structure!r} of {module!r} is not one of {', '.join(blocked)}")
            site = layer_map.find_linear(module)
            _check_factors(module, site, structure, arrays)
            _check_gemm(module, site)
            if site.node.op_type == "MatMul":
                check_bias(module, site, bias)

    def ensures(self, model: ir.Model) -> None:
        check_no_dangling_values(model.graph)

    def call(self, model: ir.Model) -> StatsResult:
        stats = SplitStructuredStats()
        if not self.factors:
            return StatsResult(model, modified=False, stats=stats)
        graph = model.graph
        layer_map = build_layer_map(graph)
        counts: collections.Counter = collections.Counter()
        for module, (structure, arrays, bias) in self.factors.items():
            site = layer_map.find_linear(module)
            stats.params_before += site.in_features * site.out_features
            stats.params_after += sum(np.asarray(array).size for array in arrays)
            _replace(graph, site, STRUCTURES[structure], arrays, bias)
            counts[STRUCTURES[structure].op] += 1
        graph.opset_imports[DOMAIN] = DOMAIN_VERSION
        stats.ops = dict(sorted(counts.items()))
        return StatsResult(model, modified=True, stats=stats)


def _check_factors(module: str, site: LinearSite, structure: str, arrays) -> None:
    entry = STRUCTURES[structure]
    shapes = [np.shape(array) for array in arrays]
    try:
        if len(shapes) != len(entry.factor_names):
            raise ShapeError(f"{entry.op} needs {', '.join(entry.factor_names)}")
        blocks, per_in, _, per_out = BLOCK_SHAPES[entry.op](*shapes)
    except ShapeError as exc:
        raise PassInputError(f"factors of {module!r}: {exc}") from exc
    if (blocks * per_in, blocks * per_out) != (site.in_features, site.out_features):
        raise PassInputError(
            f"{structure} factors of {module!r} give a [{blocks * per_out}, {blocks * per_in}] weight,"
            f" the graph has [{site.out_features}, {site.in_features}]"
        )


def _check_gemm(module: str, site: LinearSite) -> None:
    node = site.node
    if node.op_type != "Gemm":
        return
    attributes = node.attributes
    if attributes.get_int("transA", 0) or attributes.get_float("alpha", 1.0) != 1.0 or attributes.get_float("beta", 1.0) != 1.0:
        raise PassInputError(f"Linear {module!r} is a Gemm with transA/alpha/beta, which a structured op cannot take over")


def _replace(graph: ir.Graph, site: LinearSite, structure: Structure, arrays, bias) -> None:
    node = site.node
    op = structure.op
    dtype = site.weight.const_value.dtype.numpy()
    weights = [add_initializer(graph, name, np.asarray(array).astype(dtype))
               for name, array in zip(structure.initializer_names(site.module), arrays)]
    extra = []
    if node.op_type == "Gemm":
        if bias is not None:
            extra = [add_initializer(graph, f"{site.module}.structured_bias", np.asarray(bias).astype(dtype))]
        elif len(node.inputs) > 2 and node.inputs[2] is not None:
            extra = [node.inputs[2]]
    elif bias is not None:
        set_bias(graph, site, bias)
    new = ir.node(op, inputs=[node.inputs[0], *weights, *extra], domain=DOMAIN, name=f"{node.name}_{op}",
                  metadata_props={**node.metadata_props, STRUCTURE_KEY: op})
    old_out, out = node.outputs[0], new.outputs[0]
    out.type, out.shape = old_out.type, old_out.shape
    graph.insert_before(node, new)
    old_inputs = list(node.inputs[1:])
    name = old_out.name
    old_out.replace_all_uses_with(out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name = name
    for value in old_inputs:
        if value is not None and value not in extra:
            drop_if_unused(graph, value)
