"""Replace a Linear's weight by two low-rank factors: x·Wᵀ becomes (x·Aᵀ)·Bᵀ.

Factors follow torch's [out, in] convention: A is [rank, in], B is [out, rank], W ≈ B·A.
The original MatMul (or Gemm) node is kept and now multiplies by Bᵀ, so its output value,
its metadata and any bias Add behind it stay as they are; a new MatMul by Aᵀ is inserted
before it. An optional third array replaces the Linear's bias (the plan stores the bias with
the second factor); the graph's bias is kept when none is given.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgecompress.passes.graph_edits import StatsResult, add_initializer, drop_if_unused, require_unfused
from edgecompress.passes.layer_map import (
    LOW_RANK_FACTOR_KEY,
    LinearSite,
    PassInputError,
    build_layer_map,
)

# module -> (A, B) or (A, B, bias)
Factors = dict[str, tuple[np.ndarray, ...]]


@dataclasses.dataclass
class SplitLowRankStats:
    matmuls_split: int = 0
    params_before: int = 0  # weights of the split Linears
    params_after: int = 0  # their factors


class SplitLowRankPass(ir.passes.InPlacePass):
    """Split the Linears named in `factors` (full module names) into two MatMuls.

    Runs on the float export, before any weight format pass: it finds each Linear's MatMul/Gemm by
    its module scope, which fused ops and MatMulNBits are not (`requires` refuses a fused model; a Linear that is
    no longer a MatMul or Gemm is not found)."""

    def __init__(self, factors: Factors):
        super().__init__()
        self.factors = factors

    def requires(self, model: ir.Model) -> None:
        require_unfused(model, type(self).__name__)
        layer_map = build_layer_map(model.graph)
        sites = {}
        for module, arrays in self.factors.items():
            site = layer_map.find_linear(module)
            if site.node.metadata_props.get(LOW_RANK_FACTOR_KEY) == "B":
                raise PassInputError(f"Linear {module!r} is already split into low-rank factors")
            if site.module in sites:
                raise PassInputError(
                    f"Linear {site.module!r} is given factors twice (as {module!r} and {sites[site.module]!r})"
                )
            sites[site.module] = module
            a, b, bias = _unpack(module, arrays)
            _check_factor_shapes(module, site, a, b)
            check_bias(module, site, bias)

    def call(self, model: ir.Model) -> StatsResult:
        stats = SplitLowRankStats()
        graph = model.graph
        layer_map = build_layer_map(graph)
        for module, arrays in self.factors.items():
            site = layer_map.find_linear(module)
            a, b, bias = _unpack(module, arrays)
            stats.params_before += site.in_features * site.out_features
            stats.params_after += a.size + b.size
            _split(graph, site, a, b)
            if bias is not None:
                set_bias(graph, site, bias)
            stats.matmuls_split += 1
        return StatsResult(model, modified=bool(self.factors), stats=stats)


def _unpack(module: str, arrays) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if not isinstance(arrays, (tuple, list)) or len(arrays) not in (2, 3):
        raise PassInputError(f"factors of {module!r} must be (A, B) or (A, B, bias)")
    a, b = np.asarray(arrays[0]), np.asarray(arrays[1])
    bias = np.asarray(arrays[2]) if len(arrays) == 3 and arrays[2] is not None else None
    return a, b, bias


def check_bias(module: str, site: LinearSite, bias: np.ndarray | None) -> None:
    if bias is None:
        return
    if bias.shape != (site.out_features,):
        raise PassInputError(f"bias of {module!r} has shape {bias.shape}, expected ({site.out_features},)")
    has_bias = site.bias_node is not None or (site.node.op_type == "Gemm" and len(site.node.inputs) > 2)
    if not has_bias:
        raise PassInputError(f"factors give a bias for {module!r} but its Linear has none in the graph")


def set_bias(graph: ir.Graph, site: LinearSite, bias: np.ndarray) -> None:
    """Point the bias Add (or the Gemm's C input) at a new initializer holding `bias`."""
    if site.bias_node is not None:
        consumer = site.bias_node
        index = 1 if consumer.inputs[0] is site.node.outputs[0] else 0
    else:
        consumer, index = site.node, 2
    old = consumer.inputs[index]
    dtype = old.const_value.dtype.numpy() if old.const_value is not None else bias.dtype
    new = add_initializer(graph, f"{site.module}.low_rank_bias", bias.astype(dtype))
    consumer.replace_input_with(index, new)
    drop_if_unused(graph, old)


def _check_factor_shapes(module: str, site: LinearSite, a: np.ndarray, b: np.ndarray) -> None:
    expected_in, expected_out = site.in_features, site.out_features
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise PassInputError(
            f"factors of {module!r} must be A [rank, in] and B [out, rank], got {a.shape} and {b.shape}"
        )
    if a.shape[1] != expected_in or b.shape[0] != expected_out:
        raise PassInputError(
            f"factors of {module!r} give a [{b.shape[0]}, {a.shape[1]}] weight,"
            f" the graph has [{expected_out}, {expected_in}]"
        )


def _split(graph: ir.Graph, site: LinearSite, a: np.ndarray, b: np.ndarray) -> None:
    dtype = site.weight.const_value.dtype.numpy()
    node = site.node
    a_t = add_initializer(graph, f"{site.module}.low_rank_a_t", a.T.astype(dtype))
    # A Gemm with transB=1 reads its weight as [out, in]; everything else reads Wᵀ [in, out].
    reads_untransposed = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
    b_weight = b if reads_untransposed else b.T
    b_value = add_initializer(graph, f"{site.module}.low_rank_b_t", b_weight.astype(dtype))

    first = ir.node(
        "MatMul",
        inputs=[node.inputs[0], a_t],
        name=f"{node.name}_low_rank_a",
        metadata_props={**node.metadata_props, LOW_RANK_FACTOR_KEY: "A"},
    )
    first.outputs[0].name = f"{node.outputs[0].name}_low_rank_a"
    graph.insert_before(node, first)

    old_weight_input = node.inputs[1]
    node.replace_input_with(0, first.outputs[0])
    node.replace_input_with(1, b_value)
    node.metadata_props[LOW_RANK_FACTOR_KEY] = "B"
    drop_if_unused(graph, old_weight_input)
