"""make_plan: run a compression method's stages in order on a torch model and return its CompressionPlan.

The methods and their stages are typed entries in edgecompress/methods.py (layer choice, factors, refit, the
embedding's share); each stage is a function of one PlanState (attribution/plan_state.py) in its own module:
attribution/layer_choice.py (score, choose, cache inputs, remove), attribution/embedding_stage.py,
attribution/factor_choice.py (largest σ, or GRASP's gradient attribution) and attribution/refit_stage.py.
This module checks the options, runs the stages, and assembles the plan.

Structures (structure="lowrank" by default; "monarch" / "blast" with `blocks` blocks, for methods that keep
the largest singular values): each replaced Linear gets the parameters its low-rank rank would give it
(structures.Structure.rank_for) and the projection of its weight onto the structure (attribution/structured.py): for
whitened methods Monarch in each input block's whitened space and BLAST on the full calibration Gram, in plain
Frobenius norm otherwise; refits train those factors as they train low-rank ones. The layers are chosen by BI
as for low-rank.

Options (methods.MethodOptions): schedule="joint" (the default) scores all chosen layers' σ in one gradient pass
instead of GRASP's 2 passes per layer (about 2|R| times cheaper; on SmolLM2-135M at 9.5 % it gave ppl 55.2, the
reference point, against 60.0 for the official code's sequential order, kept as schedule="sequential");
whitening="compressed" whitens each Linear with the activations of the already-compressed model
(measured worse than "original" on SmolLM2-135M, kept as an ablation).

The model is left as it came in: every swapped module, requires_grad flag and the device are restored.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager

from edgecompress.attribution.layer_walker import decoder_layers, layer_linears, layer_prefix
from edgecompress.attribution.plan_state import PlanBuilder, PlanState
from edgecompress.calibrate import CalibrationSet
from edgecompress.errors import EdgeCompressError
from edgecompress.methods import AUTO_METHODS, MethodOptions, check_method, resolve_method
from edgecompress.options import DEFAULT_DEVICE, DEFAULT_METHOD, DEFAULT_RHO, check_ratio, check_rho, check_structure
from edgecompress.plan import CompressionPlan, LayerPlan, model_weights_hash
from edgecompress.report import peak_rss_mb
from edgecompress.structures import STRUCTURES


class _StageTimer:
    """Wraps a progress callback and sums the wall time between consecutive reports per stage ("refit layer
    12" counts as "refit layer"), with the process's peak RSS so far at the stage's last report: where the
    attribution's time and memory go, for the build report (not plan.json)."""

    def __init__(self, progress):
        self.progress, self.seconds, self.peak_mb = progress, {}, {}
        self.last = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        key = re.sub(r"\s*\d+$", "", stage)
        self.seconds[key] = self.seconds.get(key, 0.0) + now - self.last
        self.peak_mb[key] = peak_rss_mb()
        self.last = now
        if self.progress is not None:
            self.progress(stage, done, total)

    def stages(self) -> dict[str, dict]:
        return {stage: {"seconds": round(seconds, 2), "peak_rss_mb_so_far": self.peak_mb[stage]}
                for stage, seconds in self.seconds.items()}


def make_plan(
    model,
    calib: CalibrationSet,
    method: str = DEFAULT_METHOD,
    ratio: float | None = 0.2,
    rho: float = DEFAULT_RHO,
    device: str = DEFAULT_DEVICE,
    progress=None,
    **options,
) -> CompressionPlan:
    """Decide the compression of `model` on `calib` and return the plan (the model is unchanged).

    ratio: target fraction of ALL parameters removed (embeddings included); with `n_layers` given,
    the layer count is fixed instead and ratio may be None. rho: fraction of each replaced matrix's
    parameters removed (k = floor(mn(1-rho)/(m+n))); methods over all layers solve their own rho.
    options: methods.MethodOptions' fields (structure / blocks: what replaced Linears become; refit_steps,
    refit_lr; embedding_share, None for the method's own; ...). progress(stage, done, total) is called as
    work advances.
    """
    requested, name = method, resolve_method(method, ratio)
    chosen = check_method(name)
    if options.get("n_layers") is None or chosen.layers.scope == "all":
        ratio = check_ratio(ratio)
    rho = check_rho(rho)
    state_options = _checked_options(model, chosen, name, options)
    started = time.perf_counter()
    model_hash = model_weights_hash(model)
    timer = _StageTimer(progress)
    with _planning_mode(model, device):
        state = PlanState(model, calib, name, chosen, ratio, rho, state_options, timer,
                          sum(p.numel() for p in model.parameters()), PlanBuilder(layer_prefix(model)))
        for stage in chosen.stages:
            stage.function()(state)
        plan = _assemble_plan(state)
    plan.model_hash = model_hash
    if requested != name:
        plan.settings["method_requested"] = requested
        plan.settings["auto_rule"] = [list(rule) for rule in AUTO_METHODS]
    # Wall time is reported by the caller, not stored in plan.json (same inputs, same bytes).
    plan.elapsed_seconds = time.perf_counter() - started
    plan.attribute_stages = timer.stages()
    return plan


def _checked_options(model, method, name: str, options: dict) -> MethodOptions:
    """The method's options, every one checked before any pass over the data (refit defaults filled in)."""
    unknown = sorted(set(options) - set(MethodOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"make_plan() got unexpected options {', '.join(unknown)}")
    if options.get("embedding_share") is None:
        options["embedding_share"] = method.embedding_share
    checked = MethodOptions(**options)
    checked.blocks = check_structure(checked.structure, checked.blocks, name)
    _check_blocks_divide(model, checked.structure, checked.blocks)
    return checked.checked(method)


@contextmanager
def _planning_mode(model, device: str):
    """The model on `device` in eval mode without gradients for its own weights; all of it restored on exit."""
    original_device, was_training = next(model.parameters()).device, model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.to(device).eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.to(original_device).train(was_training)


def _check_blocks_divide(model, structure: str, blocks: int | None) -> None:
    """Every Linear a structured plan may replace must split into `blocks` x `blocks` equal blocks."""
    if not STRUCTURES[structure].blocked:
        return
    for index, layer in enumerate(decoder_layers(model)):
        for name, linear in layer_linears(layer).items():
            if linear.in_features % blocks or linear.out_features % blocks:
                raise EdgeCompressError(
                    f"--blocks {blocks} does not divide layer {index}'s {name} "
                    f"({linear.out_features} x {linear.in_features}); pick a common divisor of the model's widths"
                )


def _settings(state: PlanState) -> dict:
    """plan.json's record of the method and its options (rho: the one asked, or rho_uniform when solved)."""
    settings = {"method": state.name, "ratio": state.ratio, "rho": state.rho if state.chosen_rho is None else None,
                **state.method.settings(), **state.options.settings()}
    if state.chosen_rho is not None:
        settings["rho_uniform"] = state.chosen_rho
    return settings


def _assemble_plan(state: PlanState) -> CompressionPlan:
    builder, dense_total = state.builder, state.dense_total
    layers = decoder_layers(state.model)
    action = state.method.layers.action
    layer_plans = [
        LayerPlan(index=i, name=f"{builder.prefix}.{i}", action=action if i in state.chosen else "keep",
                  linears=sorted(builder.linears.get(i, []), key=lambda lin: lin.name))
        for i in range(len(layers))
    ]
    if state.scores is not None:
        state.plan_scores["block_influence"] = state.scores.block_influence
    saved = state.removed + builder.saved + (state.embedding.saving if state.embedding is not None else 0)
    plan = CompressionPlan(
        method=state.name,
        settings=_settings(state),
        layers=layer_plans,
        scores=state.plan_scores,
        params={
            "dense_total": dense_total,
            "removed": saved,
            "after": dense_total - saved,
            "achieved_ratio": saved / dense_total,
            "target_ratio": state.ratio,
            "counts_embeddings": True,
        },
        model_hash="",
        calibration=state.calib.describe(),
        model={"architecture": type(state.model).__name__, "num_hidden_layers": len(layers),
               "layer_prefix": builder.prefix},
        factors=builder.factors,
    )
    plan.embedding = state.embedding
    return plan
