"""What the stages of one make_plan call share (`PlanState`), and the per-Linear decisions they add (`PlanBuilder`).

Each stage of a method (edgecompress/methods.py) is a function of the state: it reads the inputs and what the
earlier stages decided, and adds its own decisions. The model itself is left as it came in by every stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from edgecompress.attribution.singular_basis import SingularBasis
from edgecompress.calibrate import CalibrationSet
from edgecompress.methods import Method, MethodOptions
from edgecompress.plan import LinearPlan, low_rank_rank, low_rank_saving
from edgecompress.structures import STRUCTURES


def linear_params(linear, rho: float, structure: str, blocks: int | None) -> tuple[int, int]:
    """(rank, factor parameters) of one replaced Linear: the low-rank rank for rho, or the structure's."""
    m, n = linear.out_features, linear.in_features
    entry = STRUCTURES[structure]
    rank = entry.rank_for(m, n, low_rank_rank(m, n, rho), blocks)
    return rank, entry.params(m, n, rank, blocks)


class PlanBuilder:
    """Collects per-Linear decisions and their factors."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.linears: dict[int, list[LinearPlan]] = {}
        self.factors: dict[str, np.ndarray] = {}
        self.saved = 0

    def add(self, index, name, linear, basis: SingularBasis, kept, summary):
        record = LinearPlan(
            name=name, module=f"{self.prefix}.{index}.{name}", in_features=linear.in_features,
            out_features=linear.out_features, rank=len(kept), kept_indices=list(kept),
            has_bias=linear.bias is not None, basis=basis.kind, scores=summary,
        )
        a, b = basis.factors(kept)
        self.factors[f"{record.module}.A"] = a.cpu().numpy()
        self.factors[f"{record.module}.B"] = b.cpu().numpy()
        if basis.bias is not None:
            self.factors[f"{record.module}.bias"] = basis.bias.float().cpu().numpy()
        record.params = a.numel() + b.numel()
        self.linears.setdefault(index, []).append(record)
        self.saved += low_rank_saving(record.out_features, record.in_features, record.rank)
        return a, b

    def add_structured(self, index, name, linear, structure: str, blocks: int, rho: float, gram, jitter: float):
        """Project `linear` onto Monarch/BLAST with the parameters of its low-rank rank (activation-aware when
        `gram` is given); records it and returns its factors by name and its bias."""
        rank, params = linear_params(linear, rho, structure, blocks)
        weight = linear.weight.detach().double().t()  # [in, out]: the reference layout
        entry = STRUCTURES[structure]
        arrays = entry.project()(weight, blocks, rank, gram, jitter)
        factors = dict(zip(entry.factor_names, arrays))
        record = LinearPlan(
            name=name, module=f"{self.prefix}.{index}.{name}", in_features=linear.in_features,
            out_features=linear.out_features, rank=rank, kept_indices=[], has_bias=linear.bias is not None,
            basis="whitened" if gram is not None else "weight", scores=projection_errors(weight, structure, factors, gram),
            structure=structure, blocks=blocks, params=params,
        )
        for part, array in factors.items():
            self.factors[f"{record.module}.{part}"] = array.cpu().numpy()
        bias = None if linear.bias is None else linear.bias.detach().float().cpu()
        if bias is not None:
            self.factors[f"{record.module}.bias"] = bias.numpy()
        self.linears.setdefault(index, []).append(record)
        self.saved += linear.out_features * linear.in_features - params
        return factors, bias


def projection_errors(weight, structure: str, factors: dict, gram) -> dict:
    """Relative error of the projection in Frobenius norm, and on the calibration inputs when whitened."""
    from edgecompress.kernels.reference import dense_weight

    entry = STRUCTURES[structure]
    approx = torch.as_tensor(dense_weight(entry.op, *(f.cpu().numpy() for f in factors.values())), dtype=torch.float64)
    delta = approx - weight.cpu()
    projection = entry.projection_name(whitened=gram is not None)
    summary = {"metric": "relative_error", "projection": projection, "frobenius": float(delta.norm() / weight.norm())}
    if gram is not None:
        gram = gram.cpu().double()
        summary["calibration_output"] = float(torch.sqrt(torch.trace(delta.t() @ gram @ delta)
                                                         / torch.trace(weight.t().cpu() @ gram @ weight.cpu())))
    return summary


@dataclass
class PlanState:
    """The inputs of one plan and what its stages have decided so far."""

    model: torch.nn.Module
    calib: CalibrationSet
    name: str  # the method's name, resolved (not "auto")
    method: Method
    ratio: float | None
    rho: float
    options: MethodOptions
    progress: Callable[[str, int, int], None] | None
    dense_total: int
    builder: PlanBuilder
    scores: object | None = None  # LayerScores from the recorded pass; None when the method needs no data
    walker: object | None = None  # LayerWalker over that pass
    chosen: list[int] = field(default_factory=list)
    chosen_rho: float | None = None  # one rho solved for methods over all layers
    embedding_budget: tuple | None = None  # (share, exact tokens, parameters saved) the tied table will give
    embedding: object | None = None  # EmbeddingPlan of the tied table, when a share of it is factored
    removed: int = 0  # parameters of removed layers
    plan_scores: dict = field(default_factory=dict)

    def report(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)
