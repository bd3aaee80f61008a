"""What a replaced Linear becomes: one `Structure` entry per kind, the one home of its facts.

An entry holds the factor names (plan, factors.safetensors and the op's inputs after X, in order), the rank
rule (the parameters of the low-rank rank GRASP/SVD-LLM would use) and the factor shapes (the parameter
count follows from them), the `ai.edgecompress` op and its factors' initializer names in a graph, and where
its PyTorch module, its projection and its ONNX lowering live. Those three are named as "module:attribute" and imported
on use: this module imports no torch and no onnx, so the plan, the options and the graph passes read it too.

Adding a structure: one entry here, its kernel (kernels/reference.py and the op library), and the three
functions the entry names.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable

from edgecompress.errors import EdgeCompressError


def _low_rank_rank(out_features: int, in_features: int, rank: int, blocks: int | None) -> int:
    return rank


def _monarch_rank(out_features: int, in_features: int, rank: int, blocks: int | None) -> int:
    """Channels R = the rank rounded to the nearest multiple of b (ties down), at least b, at most b·min(p, q)."""
    multiple = (2 * rank + blocks - 1) // (2 * blocks)
    return blocks * max(1, min(multiple, min(out_features, in_features) // blocks))


def _blast_rank(out_features: int, in_features: int, rank: int, blocks: int | None) -> int:
    """floor(rank·(K+N) / (K+N+b²)): BLAST's b²·r couplings paid for; at least 1, at most min(K, N)."""
    total = out_features + in_features
    return max(1, min((rank * total) // (total + blocks * blocks), out_features, in_features))


def _low_rank_shapes(k: int, n: int, r: int, b: int | None) -> tuple:
    return (r, k), (n, r)


def _monarch_shapes(k: int, n: int, r: int, b: int | None) -> tuple:
    return (b, k // b, r), (b, r, n // b)


def _blast_shapes(k: int, n: int, r: int, b: int | None) -> tuple:
    return (b, r, n // b), (b, b, r), (b, k // b, r)


@dataclass(frozen=True)
class Structure:
    name: str
    factor_names: tuple[str, ...]  # `<module>.<name>` in factors.safetensors, in the op's input order
    op: str  # the ai.edgecompress op (kernels/reference.py)
    summary: str  # one line for --help and docs
    rank_rule: Callable[[int, int, int, int | None], int]  # (out, in, low-rank rank, blocks) -> its rank
    shape_rule: Callable[[int, int, int, int | None], tuple]  # (in, out, rank, blocks) -> factor shapes
    lowering: str  # passes/lower_custom_ops.py's rewrite of the op into standard ONNX ops
    # "module:attribute" homes, imported on use (torch stays out of this module)
    torch_module: str | None = None  # nn.Module taking (*factors, bias); None: the low-rank pair of Linears
    projection: str | None = None  # (weight [in, out], blocks, rank, gram, jitter) -> factors in order
    projection_names: tuple[str, str] = ("", "")  # what reports call the projection: plain, with a Gram
    blocked: bool = False  # takes `blocks` (Monarch, BLAST)

    def rank_for(self, out_features: int, in_features: int, low_rank: int, blocks: int | None) -> int:
        """The rank with the parameters of a low-rank rank `low_rank` (equal parameter counts)."""
        return self.rank_rule(out_features, in_features, low_rank, blocks)

    def factor_shapes(self, out_features: int, in_features: int, rank: int, blocks: int | None) -> tuple:
        """The shapes its factors have, in `factor_names` order (the layouts of kernels/reference.py)."""
        return self.shape_rule(in_features, out_features, rank, blocks)

    def params(self, out_features: int, in_features: int, rank: int, blocks: int | None) -> int:
        """Factor parameters of one Linear (bias excluded)."""
        return sum(math.prod(shape) for shape in self.factor_shapes(out_features, in_features, rank, blocks))

    def initializer_names(self, module: str) -> tuple[str, ...]:
        """Its factors' initializer names in a graph: `<module>.<op>_<factor>`."""
        return tuple(f"{module}.{self.op.lower()}_{name.lower()}" for name in self.factor_names)

    def projection_name(self, whitened: bool) -> str:
        return self.projection_names[1 if whitened else 0]

    def torch_class(self) -> Any:
        return _load(self.torch_module)

    def project(self) -> Callable:
        return _load(self.projection)

    def lower(self) -> Callable:
        return _load(self.lowering)


def _load(home: str | None) -> Any:
    if not home:
        raise EdgeCompressError("this structure has no such function")
    module, _, attribute = home.partition(":")
    return getattr(importlib.import_module(module), attribute)


LOWRANK = Structure(
    "lowrank", ("A", "B"), "LowRankMatMul", "two low-rank MatMuls", _low_rank_rank, _low_rank_shapes,
    lowering="edgecompress.passes.lower_custom_ops:_lower_low_rank",
)
MONARCH = Structure(
    "monarch", ("W1", "W2"), "MonarchMatMul", "block-diagonal, stride permutation, block-diagonal",
    _monarch_rank, _monarch_shapes, lowering="edgecompress.passes.lower_custom_ops:_lower_monarch",
    torch_module="edgecompress.attribution.structured:MonarchLinear",
    projection="edgecompress.attribution.structured:project_monarch",
    projection_names=("blockwise SVD", "blockwise SVD (block-whitened)"), blocked=True,
)
BLAST = Structure(
    "blast", ("U", "S", "V"), "BlastMatMul", "block low-rank with shared bases and block couplings",
    _blast_rank, _blast_shapes, lowering="edgecompress.passes.lower_custom_ops:_lower_blast",
    torch_module="edgecompress.attribution.structured:BlastLinear",
    projection="edgecompress.attribution.structured:project_blast",
    projection_names=("ALS", "ALS (full Gram)"), blocked=True,
)
STRUCTURES: dict[str, Structure] = {s.name: s for s in (LOWRANK, MONARCH, BLAST)}
BY_OP: dict[str, Structure] = {s.op: s for s in STRUCTURES.values()}


def get(name: str) -> Structure:
    if name not in STRUCTURES:
        raise EdgeCompressError(f"unknown structure '{name}'; use one of {', '.join(STRUCTURES)}")
    return STRUCTURES[name]
