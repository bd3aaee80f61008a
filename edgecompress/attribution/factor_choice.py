"""The factor stages of a method: which singular groups of each chosen layer's Linears stay.

largest_sigma_factors: truncation by largest σ, plain (SVD of W) or whitened (SVD-LLM), or the projection onto a
Monarch / BLAST structure. attributed_factors: GRASP's gradient attribution, the groups with the largest |σ·G|
(in the weight's or the whitened basis), each matrix at rho or the budget split by score across matrices.
"""

from __future__ import annotations

import torch

from edgecompress.attribution.grasp import accumulated_sigma_gradients, group_scores
from edgecompress.attribution.layer_walker import (
    ATTENTION_LINEARS,
    LINEAR_NAMES,
    MLP_LINEARS,
    decoder_layers,
    layer_linears,
    set_submodule,
)
from edgecompress.attribution.low_rank import install_low_rank
from edgecompress.attribution.plan_state import PlanState
from edgecompress.attribution.singular_basis import SingularBasis, score_summary, top_indices
from edgecompress.attribution.structured import install_structured
from edgecompress.attribution.svd import largest_sigma, weight_basis
from edgecompress.attribution.svd_llm import input_grams, whitened_basis
from edgecompress.plan import low_rank_rank
from edgecompress.structures import STRUCTURES

# Linears whose inputs are ready at the same time inside a decoder layer, in execution order.
LINEAR_STAGES = (ATTENTION_LINEARS[:3], ATTENTION_LINEARS[3:], MLP_LINEARS[:2], MLP_LINEARS[2:])


def basis_for(linear, kind: str, grams: dict | None, name: str, jitter: float) -> SingularBasis:
    if kind == "whitened":
        return whitened_basis(linear, grams[name], jitter)
    return weight_basis(linear)


@torch.no_grad()
def largest_sigma_factors(state: PlanState) -> None:
    """Truncation by largest σ (plain or whitened), layer by layer with one input set in memory.

    whitening="original": Gram matrices from the dense model's activations (SVD-LLM).
    whitening="compressed": each Linear is whitened with the activations it will really see,
    i.e. after every earlier chosen layer and earlier Linear of its own layer is compressed, so
    the factors absorb the upstream error (the model is restored afterwards).
    """
    model, walker, options, basis_kind = state.model, state.walker, state.options, state.method.factors.basis
    layers = decoder_layers(model)
    error_aware = basis_kind == "whitened" and options.whitening == "compressed"
    stages = LINEAR_STAGES if error_aware else (LINEAR_NAMES,)
    # Dense inputs unless error-aware: then the walk runs the layers below as compressed so far.
    chosen = state.chosen
    walk = walker.inputs(chosen, dense=not error_aware) if basis_kind == "whitened" else ((i, None) for i in chosen)
    installed = {}
    try:
        for step, (index, hidden) in enumerate(walk):
            for names in stages:
                linears = layer_linears(layers[index], names)
                grams = input_grams(walker, index, linears, hidden) if basis_kind == "whitened" else None
                for name, linear in linears.items():
                    original = _factor_one(state, index, name, linear, grams, install=error_aware)
                    if original is not None:
                        installed[f"{state.builder.prefix}.{index}.{name}"] = original
            state.report(f"factors layer {index}", step + 1, len(chosen))
    finally:
        for key, original in installed.items():
            set_submodule(model, key, original)


def _factor_one(state: PlanState, index: int, name: str, linear, grams: dict | None, install: bool):
    """Record one Linear's largest-σ factors (or structure projection); with `install` (error-aware whitening:
    the next Linears see this one compressed) put them in the model and return the original module."""
    builder, options = state.builder, state.options
    key = f"{builder.prefix}.{index}.{name}"
    if STRUCTURES[options.structure].blocked:
        gram = grams[name] if grams is not None else None
        factors, bias = builder.add_structured(index, name, linear, options.structure, options.blocks, state.rho,
                                               gram, options.jitter)
        return install_structured(state.model, key, options.structure, factors, bias) if install else None
    basis = basis_for(linear, state.method.factors.basis, grams, name, options.jitter)
    kept = largest_sigma(basis, low_rank_rank(linear.out_features, linear.in_features, state.rho))
    summary = score_summary(basis.sigma.double() ** 2, kept, "sigma^2")
    a, b = builder.add(index, name, linear, basis, kept, summary)
    return install_low_rank(state.model, key, a, b, basis.bias) if install else None


def _attribution_groups(chosen: list[int], schedule: str) -> list[list[tuple]]:
    """Which (layer, Linears) are scored together: all chosen layers in one pass ("joint"), or GRASP's order,
    deepest layer first, MLP then attention ("sequential")."""
    if schedule == "joint":
        return [[(index, names) for index in chosen for names in (MLP_LINEARS, ATTENTION_LINEARS)]]
    return [[(index, names)] for index in sorted(chosen, reverse=True) for names in (MLP_LINEARS, ATTENTION_LINEARS)]


def attributed_factors(state: PlanState) -> None:
    """GRASP: gradient-scored groups; each group of Linears is scored on the model with the groups scored
    before it already compressed (the model is restored afterwards)."""
    model, walker, options, factors = state.model, state.walker, state.options, state.method.factors
    layers = decoder_layers(model)
    with torch.no_grad():
        inputs = walker.dense_inputs(state.chosen)
        grams = {}
        if factors.basis == "whitened":
            for index in state.chosen:
                grams[index] = input_grams(walker, index, layer_linears(layers[index]), inputs[index])
    groups = _attribution_groups(state.chosen, options.schedule)
    installed = {}
    try:
        for step, group in enumerate(groups):
            targets = {}
            for index, names in group:
                for name, linear in layer_linears(layers[index], names).items():
                    basis = basis_for(linear, factors.basis, grams.get(index), name, options.jitter)
                    targets[f"{state.builder.prefix}.{index}.{name}"] = (index, name, linear, basis)
            _score_group(state, group, targets, inputs, installed)
            state.report("blocks", step + 1, len(groups))
    finally:
        for key, original in installed.items():
            set_submodule(model, key, original)


def _score_group(state: PlanState, group, targets: dict, inputs, installed: dict) -> None:
    """Score one group's singular groups by accumulated σ-gradients, keep the best, install them (later groups,
    shallower blocks, see this one compressed, as in GRASP); the original modules go into `installed` by name."""
    options = state.options
    start = min(index for index, _ in group)
    label = f"layer {group[0][0]}" if len(group) == 1 else "all layers"

    def step_progress(stage, done, total):
        state.report(f"{label} {stage}", done, total)

    bases = {key: value[3] for key, value in targets.items()}
    sums = accumulated_sigma_gradients(state.walker, bases, start, inputs[start], step_progress)
    scored = {key: group_scores(basis, sums[key], options.score_metric) for key, (_, _, _, basis) in targets.items()}
    ranks = ranks_for(targets, scored, state.rho, state.method.factors.allocation)
    for key, (index, name, linear, basis) in targets.items():
        scores = scored[key]
        kept = top_indices(scores, ranks[key])
        a, b = state.builder.add(index, name, linear, basis, kept, score_summary(scores, kept, options.score_metric))
        installed[key] = install_low_rank(state.model, key, a, b, basis.bias)


def ranks_for(targets: dict, scored: dict, rho: float, allocation: str) -> dict[str, int]:
    """Kept groups per matrix: each matrix's rank for rho ("matrix"), or ("global") the same parameter budget
    spent on the groups with the highest attribution score per parameter across all the matrices scored
    together: |σ_k G_k| estimates the loss change of dropping group k, so scores compare across matrices."""
    shapes = {key: (linear.out_features, linear.in_features) for key, (_, _, linear, _) in targets.items()}
    ranks = {key: low_rank_rank(m, n, rho) for key, (m, n) in shapes.items()}
    if allocation == "matrix":
        return ranks
    budget = sum((m + n) * ranks[key] for key, (m, n) in shapes.items())
    full = {key: min(m, n, m * n // (m + n)) for key, (m, n) in shapes.items()}  # above it a factor saves nothing
    order = sorted(((float(v) / sum(shapes[key]), key) for key, s in scored.items() for v in s.tolist()), reverse=True)
    chosen = {key: 1 for key in shapes}  # every matrix keeps its best group: a rank-0 factor is no Linear
    budget -= sum(sum(shape) for shape in shapes.values())
    first = set()
    for _, key in order:
        if key not in first:  # the group already kept
            first.add(key)
            continue
        cost = sum(shapes[key])
        if chosen[key] < full[key] and budget >= cost:
            chosen[key] += 1
            budget -= cost
    return chosen
