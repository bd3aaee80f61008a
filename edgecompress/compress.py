"""make_plan: run a compression method end to end on a torch model and return its CompressionPlan.

Methods (registered in edgecompress.options.METHODS; layer choice / action / basis / which groups stay):
- grasp:          lowest BI, replace, SVD of W,       top-k by |σ·G| (gradient attribution)
- grasp-topsigma: lowest BI, replace, SVD of W,       largest σ (ablation: no attribution)
- grasp-w:        lowest BI, replace, whitened W L,   largest whitened σ (SVD-LLM inside GRASP layers)
- grasp-wt:       lowest BI, replace, whitened W L,   top-k by |σ·G| in the whitened basis
- grasp-wr:       grasp-w, then a short layer-wise refit of the factors (Adam, calibration data only:
                  each replaced layer, fed the compressed model's hidden states, learns to reproduce
                  the dense model's output; see attribution/refit.py). Labelled: it trains factors.
- grasp-wre:      grasp-w, then an end-to-end refit: all replaced layers' factors jointly, so the
                  model's final normed hidden states match the dense model's (slower: it backpropagates
                  from the top of the model down to the lowest replaced layer).
- grasp-wrk:      grasp-w, the layer-wise refit, then an end-to-end refit on the dense model's logits (KL),
                  early-stopped on the calibration's held-out windows; 5 % of all parameters from the tied
                  embedding (attribution/embedding.py) when the model has one. What `auto` resolves to.
- grasp-wtk:      as grasp-wrk, but gradient-scored whitened groups, with the chosen layers' budget split
                  across matrices by score per parameter (allocation "global").
- shortgpt:       lowest BI, remove
- svd:            all layers, replace, SVD of W,      largest σ, one rho for all matrices
- svd-llm:        all layers, replace, whitened W L,  largest whitened σ, one rho for all matrices

Structures (structure="lowrank" by default; "monarch" / "blast" with `blocks` blocks, for methods that keep
the largest singular values): each replaced Linear gets the parameters its low-rank rank would give it
(structures.Structure.rank_for) and the projection of its weight onto the structure (attribution/structured.py): for
whitened methods Monarch in each input block's whitened space and BLAST on the full calibration Gram, in plain
Frobenius norm otherwise; grasp-wr / grasp-wre refit those factors as they refit low-rank ones. The layers
are chosen by BI as for low-rank.

Options: schedule="joint" (the default) scores all chosen layers' σ in one gradient pass instead of
GRASP's 2 passes per layer (about 2|R| times cheaper; on SmolLM2-135M at 9.5 % it gave ppl 55.2, the
reference point, against 60.0 for the official code's sequential order, kept as schedule="sequential");
whitening="compressed" whitens each Linear with the activations of the already-compressed model
(measured worse than "original" on SmolLM2-135M, kept as an ablation).

The model is left as it came in: every swapped module, requires_grad flag and the device are restored.
"""

from __future__ import annotations

import re
import time

import numpy as np
import torch

from edgecompress.attribution.block_influence import LayerScores, layer_scores
from edgecompress.attribution.grasp import accumulated_sigma_gradients, group_scores
from edgecompress.attribution.layer_walker import (
    ATTENTION_LINEARS,
    LINEAR_NAMES,
    MLP_LINEARS,
    LayerWalker,
    decoder_layers,
    record_stream,
    layer_linears,
    layer_prefix,
    set_submodule,
)
from edgecompress.attribution.low_rank import install_low_rank
from edgecompress.attribution.structured import install_structured
from edgecompress.attribution.singular_basis import SingularBasis, score_summary, top_indices
from edgecompress.attribution.svd import largest_sigma, weight_basis
from edgecompress.attribution.svd_llm import input_grams, whitened_basis
from edgecompress.calibrate import CalibrationSet
from edgecompress.errors import EdgeCompressError
from edgecompress.options import (
    AUTO_METHODS,
    DEFAULT_METHOD,
    DEFAULT_RHO,
    DEFAULT_STRUCTURE,
    MethodSpec,
    check_method,
    check_ratio,
    check_rho,
    check_score_metric,
    check_structure,
    resolve_method,
)
from edgecompress.plan import (
    CompressionPlan,
    LayerPlan,
    LinearPlan,
    count_for_ratio,
    embedding_rank_for_share,
    low_rank_rank,
    low_rank_saving,
    model_weights_hash,
    uniform_rho_for_ratio,
)
from edgecompress.report import peak_rss_mb
from edgecompress.structures import STRUCTURES

LAYER_SELECTIONS = ("bi", "angular")
SCHEDULES = ("sequential", "joint")
# (steps, learning rate) per refit scope, measured on smollm2-135m at 10 % (10 windows): layer-wise
# 64 steps at 1e-4 / 5e-4 and 128 at 1e-3 gave 53.8 / 52.4 / 51.2 from grasp-w's 58.4; end-to-end
# 64 steps at 5e-4 gave 48.6.
REFIT_DEFAULTS = {"layer": (128, 1e-3), "end-to-end": (64, 5e-4)}
# The logit (KL) refit at most 128 steps, early-stopped on held-out windows: on smollm2-135m at 20 % with
# 128 + 8 windows the held-out KL still fell at step 128 (0.475 -> 0.363), and 5e-4 beat 1e-3 on it (0.382;
# bench/results/refit-lr.json).
KL_REFIT_DEFAULTS = (128, 5e-4)
WHITENINGS = ("original", "compressed")
# Keep every layer's calibration input from the scoring pass when it fits in this many bytes
# (16 x 512 tokens of a 30-layer d=576 model: 0.6 GB); above it, in float16 when that fits (128 windows:
# 2.3 GB), until the layers are chosen: then only the chosen layers' inputs stay, in float32 (8 layers x
# 128 x 512 tokens: 1.2 GB, at most CHOSEN_INPUT_CACHE_BYTES); else they are recomputed once, after choosing.
LAYER_INPUT_CACHE_BYTES = 1 << 30
HALF_INPUT_CACHE_BYTES = 5 << 29
CHOSEN_INPUT_CACHE_BYTES = 2 << 30


def _report(progress, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


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
        _report(self.progress, stage, done, total)

    def stages(self) -> dict[str, dict]:
        return {stage: {"seconds": round(seconds, 2), "peak_rss_mb_so_far": self.peak_mb[stage]}
                for stage, seconds in self.seconds.items()}


def _linear_params(linear, rho: float, structure: str, blocks: int | None) -> tuple[int, int]:
    """(rank, factor parameters) of one replaced Linear: the low-rank rank for rho, or the structure's."""
    m, n = linear.out_features, linear.in_features
    entry = STRUCTURES[structure]
    rank = entry.rank_for(m, n, low_rank_rank(m, n, rho), blocks)
    return rank, entry.params(m, n, rank, blocks)


def _layer_saving(layer, spec: MethodSpec, rho: float, options) -> int:
    if spec.action == "remove":
        return sum(p.numel() for p in layer.parameters())
    return sum(
        lin.out_features * lin.in_features - _linear_params(lin, rho, options["structure"], options["blocks"])[1]
        for lin in layer_linears(layer).values()
    )


def _choose_layers(model, scores: LayerScores, spec, ratio, rho, dense_total, options) -> list[int]:
    """Which decoder layers to replace or remove, from BI (independent) or angular (contiguous)."""
    layers = decoder_layers(model)
    exclude = (len(layers) - 1,) if options["protect_last_layer"] else ()
    savings = [_layer_saving(layer, spec, rho, options) for layer in layers]
    # A model needs at least one decoder layer left: removal may take all but one.
    most = len(layers) - len(exclude) - (1 if spec.action == "remove" else 0)
    n_layers = options["n_layers"]
    if n_layers is not None and not 1 <= n_layers <= most:
        raise EdgeCompressError(f"cannot {spec.action} {n_layers} of {len(layers)} decoder layers (at most {most})")
    if options["layer_selection"] == "bi":
        order = scores.lowest_bi(len(layers), exclude=exclude)[:most]
        if n_layers is None:
            n_layers = count_for_ratio([savings[i] for i in order], dense_total, ratio, options["rounding"])
        return sorted(order[:n_layers])
    # Angular: the block size is the count whose (uniform) per-layer saving reaches the ratio.
    if n_layers is None:
        n_layers = count_for_ratio(sorted(savings)[::-1][:most], dense_total, ratio, options["rounding"])
    return scores.best_block(n_layers, exclude)


def _linear_record(prefix, index, name, linear, kept, basis, summary) -> LinearPlan:
    return LinearPlan(
        name=name,
        module=f"{prefix}.{index}.{name}",
        in_features=linear.in_features,
        out_features=linear.out_features,
        rank=len(kept),
        kept_indices=list(kept),
        has_bias=linear.bias is not None,
        basis=basis.kind,
        scores=summary,
    )


class _PlanBuilder:
    """Collects per-Linear decisions and their factors."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.linears: dict[int, list[LinearPlan]] = {}
        self.factors: dict[str, np.ndarray] = {}
        self.saved = 0

    def add(self, index, name, linear, basis: SingularBasis, kept, summary):
        record = _linear_record(self.prefix, index, name, linear, kept, basis, summary)
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
        rank, params = _linear_params(linear, rho, structure, blocks)
        weight = linear.weight.detach().double().t()  # [in, out]: the reference layout
        entry = STRUCTURES[structure]
        arrays = entry.project()(weight, blocks, rank, gram, jitter)
        factors = dict(zip(entry.factor_names, arrays))
        record = LinearPlan(
            name=name, module=f"{self.prefix}.{index}.{name}", in_features=linear.in_features,
            out_features=linear.out_features, rank=rank, kept_indices=[], has_bias=linear.bias is not None,
            basis="whitened" if gram is not None else "weight", scores=_projection_errors(weight, structure, factors, gram),
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


def _projection_errors(weight, structure: str, factors: dict, gram) -> dict:
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


def _basis_for(linear, kind: str, grams: dict | None, name: str, jitter: float) -> SingularBasis:
    if kind == "whitened":
        return whitened_basis(linear, grams[name], jitter)
    return weight_basis(linear)


# Linears whose inputs are ready at the same time inside a decoder layer, in execution order.
LINEAR_STAGES = (ATTENTION_LINEARS[:3], ATTENTION_LINEARS[3:], MLP_LINEARS[:2], MLP_LINEARS[2:])


@torch.no_grad()
def _largest_sigma_layers(model, walker, chosen, spec, rho, builder, options, progress):
    """Truncation by largest σ (plain or whitened), layer by layer with one input set in memory.

    whitening="original": Gram matrices from the dense model's activations (SVD-LLM).
    whitening="compressed": each Linear is whitened with the activations it will really see,
    i.e. after every earlier chosen layer and earlier Linear of its own layer is compressed, so
    the factors absorb the upstream error (the model is restored afterwards).
    """
    layers = decoder_layers(model)
    error_aware = spec.basis == "whitened" and options["whitening"] == "compressed"
    stages = LINEAR_STAGES if error_aware else (LINEAR_NAMES,)
    # Dense inputs unless error-aware: then the walk runs the layers below as compressed so far.
    walk = walker.inputs(chosen, dense=not error_aware) if spec.basis == "whitened" else ((i, None) for i in chosen)
    installed = {}
    try:
        for step, (index, hidden) in enumerate(walk):
            for names in stages:
                linears = layer_linears(layers[index], names)
                grams = input_grams(walker, index, linears, hidden) if spec.basis == "whitened" else None
                for name, linear in linears.items():
                    key = f"{builder.prefix}.{index}.{name}"
                    if STRUCTURES[options["structure"]].blocked:
                        gram = grams[name] if grams is not None else None
                        factors, bias = builder.add_structured(index, name, linear, options["structure"],
                                                               options["blocks"], rho, gram, options["jitter"])
                        if error_aware:
                            installed[key] = install_structured(model, key, options["structure"], factors, bias)
                        continue
                    basis = _basis_for(linear, spec.basis, grams, name, options["jitter"])
                    kept = largest_sigma(basis, low_rank_rank(linear.out_features, linear.in_features, rho))
                    summary = score_summary(basis.sigma.double() ** 2, kept, "sigma^2")
                    a, b = builder.add(index, name, linear, basis, kept, summary)
                    if error_aware:
                        installed[key] = install_low_rank(model, key, a, b, basis.bias)
            _report(progress, f"factors layer {index}", step + 1, len(chosen))
    finally:
        for key, original in installed.items():
            set_submodule(model, key, original)


def _attribution_layers(model, walker, chosen, spec, rho, builder, options, progress):
    """GRASP: gradient-scored groups; deepest layer first, MLP then attention (sequential), or all
    chosen layers' σ in one pass (joint)."""
    layers = decoder_layers(model)
    with torch.no_grad():
        inputs = walker.dense_inputs(chosen)
        grams = {}
        if spec.basis == "whitened":
            for index in chosen:
                grams[index] = input_grams(walker, index, layer_linears(layers[index]), inputs[index])
    if options["schedule"] == "joint":
        groups = [[(index, names) for index in chosen for names in (MLP_LINEARS, ATTENTION_LINEARS)]]
    else:
        groups = [[(index, names)] for index in sorted(chosen, reverse=True) for names in (MLP_LINEARS, ATTENTION_LINEARS)]
    installed = {}
    try:
        for step, group in enumerate(groups):
            targets = {}
            for index, names in group:
                for name, linear in layer_linears(layers[index], names).items():
                    basis = _basis_for(linear, spec.basis, grams.get(index), name, options["jitter"])
                    targets[f"{builder.prefix}.{index}.{name}"] = (index, name, linear, basis)
            start = min(index for index, _ in group)
            label = f"layer {group[0][0]}" if len(group) == 1 else "all layers"

            def step_progress(stage, done, total, label=label):
                _report(progress, f"{label} {stage}", done, total)

            bases = {key: value[3] for key, value in targets.items()}
            sums = accumulated_sigma_gradients(walker, bases, start, inputs[start], step_progress)
            scored = {key: group_scores(basis, sums[key], options["score_metric"])
                      for key, (_, _, _, basis) in targets.items()}
            ranks = _ranks(targets, scored, rho, spec.allocation)
            for key, (index, name, linear, basis) in targets.items():
                scores = scored[key]
                kept = top_indices(scores, ranks[key])
                a, b = builder.add(index, name, linear, basis, kept, score_summary(scores, kept, options["score_metric"]))
                # Later passes (shallower blocks) see this block compressed, as in GRASP.
                installed[key] = install_low_rank(model, key, a, b, basis.bias)
            _report(progress, "blocks", step + 1, len(groups))
    finally:
        for key, original in installed.items():
            set_submodule(model, key, original)


def _ranks(targets: dict, scored: dict, rho: float, allocation: str) -> dict[str, int]:
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


def _layer_targets(walker, chosen):
    """Each chosen layer's dense output on its dense input, per batch (before any factor is installed); kept in
    float16 when there are many windows (8 layers x 128 windows: 0.6 GB instead of 1.2)."""
    half = walker.n_batches > 32
    with torch.no_grad():
        inputs = walker.dense_inputs(chosen)
        return {index: [_target(walker.run_layer(index, h, batch), half) for batch, h in enumerate(inputs[index])]
                for index in chosen}


def _target(hidden: torch.Tensor, half: bool) -> torch.Tensor:
    return hidden.half() if half and float(hidden.abs().max()) < 6e4 else hidden


def _end_to_end_objective(walker, chosen, loss):
    """The dense model's final normed states from the lowest chosen layer up, as a refit Objective
    (built before any factor is installed: the layers below stay dense, so the start inputs stay valid)."""
    from edgecompress.attribution.refit import Objective

    start = min(chosen)
    with torch.no_grad():
        _, inputs = next(walker.inputs([start], dense=True))
        targets = walker.stream.final_states  # recorded with the stream (the same dense model)
        if not targets:
            targets = [walker.final_states(h, batch, start) for batch, h in enumerate(inputs)]
    return Objective(walker, start, inputs, targets, loss)


def _holdout_walker(model, calib, options):
    if calib.holdout_ids is None:
        return None
    stream = record_stream(model, calib.holdout_ids.to(next(model.parameters()).device), options["batch_size"])
    return LayerWalker(model, stream)


def _install_builder_factors(model, builder, chosen) -> dict:
    installed = {}
    for index in chosen:
        for record in builder.linears[index]:
            key = record.module
            bias = builder.factors.get(f"{key}.bias")
            bias = None if bias is None else torch.as_tensor(bias)
            factors = {part: builder.factors[f"{key}.{part}"] for part in record.factor_names}
            installed[key] = install_structured(model, key, record.structure, factors, bias)
    return installed


def _refit(model, walker, chosen, builder, spec, options, calib, progress, embedding: bool = False) -> dict:
    """Refit the chosen layers' factors in place of the ones the builder holds (model restored after).

    "layer" (grasp-wr): each replaced layer matches the dense layer's output on the compressed model's hidden
    states, bottom up (refit_layers). "end-to-end" (grasp-wre): all replaced layers jointly match the dense
    model's final normed hidden states, or its logits (spec.refit_loss "kl"), with early stopping on the
    calibration's held-out windows when it has them. "layer+end-to-end": the first as the second's start.
    """
    from edgecompress.attribution.refit import refit_end_to_end, refit_layers

    scopes = spec.refit.split("+")
    layer_targets = _layer_targets(walker, chosen) if "layer" in scopes else None
    objective = holdout = None
    if "end-to-end" in scopes:
        objective = _end_to_end_objective(walker, chosen, spec.refit_loss)
        holdout_walker = _holdout_walker(model, calib, options)
        if holdout_walker is not None:
            holdout = _end_to_end_objective(holdout_walker, chosen, spec.refit_loss)

    def report_progress(stage, done, total):
        _report(progress, stage, done, total)

    installed = _install_builder_factors(model, builder, chosen)
    if embedding and objective is not None:
        # The end-to-end refit sees the factored head (the layers learn around its error; the table's own
        # factors stay as fitted: they also serve the lookup, which starts below the refit).
        from edgecompress.attribution.embedding import install_factored_embedding

        installed.update(install_factored_embedding(model, builder.factors))
        for parameter in model.get_input_embeddings().parameters():
            parameter.requires_grad_(False)
    report = {}
    try:
        if layer_targets is not None:
            steps, lr = options["refit_layer_steps"], options["refit_layer_lr"]
            layers = refit_layers(walker, chosen, layer_targets, steps, lr, progress=report_progress)
            report["layer"] = {str(index): values for index, values in layers.items()}
            del layer_targets
        if objective is not None:
            report["end-to-end"] = refit_end_to_end(
                walker, chosen, objective.start_inputs, objective.final_targets, options["refit_steps"],
                options["refit_lr"], progress=report_progress, loss=spec.refit_loss, holdout=holdout)
        for key in installed:
            module = model.get_submodule(key)
            if not hasattr(module, "plan_factors") and not hasattr(module, "a"):
                continue  # the factored head: nothing trained
            trained = module.plan_factors() if hasattr(module, "plan_factors") else {"A": module.a.weight,
                                                                                     "B": module.b.weight}
            for part, tensor in trained.items():
                builder.factors[f"{key}.{part}"] = tensor.detach().float().cpu().numpy().copy()
    finally:
        for key, original in installed.items():
            set_submodule(model, key, original)
    return report if len(scopes) > 1 else report[spec.refit]


def _settings(method, spec, ratio, rho, options, chosen_rho=None) -> dict:
    settings = {
        "method": method,
        "ratio": ratio,
        "rho": rho,
        "layer_choice": spec.layers,
        "layer_action": spec.action,
        "basis": spec.basis if spec.action == "replace" else None,
        "selection": spec.selection if spec.action == "replace" else None,
        **{k: options[k] for k in sorted(options)},
    }
    if chosen_rho is not None:
        settings["rho_uniform"] = chosen_rho
    return settings


def make_plan(
    model,
    calib: CalibrationSet,
    method: str = DEFAULT_METHOD,
    ratio: float | None = 0.2,
    rho: float = DEFAULT_RHO,
    device: str = "cpu",
    progress=None,
    *,
    n_layers: int | None = None,
    layer_selection: str = "bi",
    schedule: str = "joint",  # one gradient pass over all chosen layers: 5x faster, same quality here
    score_metric: str = "taylor",
    rounding: str = "nearest",
    protect_last_layer: bool = False,
    batch_size: int = 1,
    jitter: float = 1e-6,
    whitening: str = "original",
    refit_steps: int | None = None,  # default: 128 (grasp-wr, per layer), 64 (grasp-wre, in all)
    refit_lr: float | None = None,  # default: 1e-3 (grasp-wr), 5e-4 (grasp-wre)
    structure: str = DEFAULT_STRUCTURE,  # lowrank | monarch | blast
    blocks: int | None = None,  # Monarch/BLAST blocks (default options.DEFAULT_BLOCKS)
    embedding_share: float | None = None,  # share of all parameters from a tied embedding (None: the method's)
    exact_tokens: int = 2048,  # tokens whose embedding rows stay exact (the most frequent in the calibration)
) -> CompressionPlan:
    """Decide the compression of `model` on `calib` and return the plan (the model is unchanged).

    ratio: target fraction of ALL parameters removed (embeddings included); with `n_layers` given,
    the layer count is fixed instead and ratio may be None. rho: fraction of each replaced matrix's
    parameters removed (k = floor(mn(1-rho)/(m+n))); methods over all layers solve their own rho.
    structure / blocks: what replaced Linears become (Monarch / BLAST at the same parameter count).
    progress(stage, done, total) is called as work advances.
    """
    requested, method = method, resolve_method(method, ratio)
    spec = check_method(method)
    if n_layers is None or spec.layers == "all":
        ratio = check_ratio(ratio)
    rho = check_rho(rho)
    blocks = check_structure(structure, blocks, method)
    _check_blocks_divide(model, structure, blocks)
    options = _checked_options(spec, structure=structure, blocks=blocks, n_layers=n_layers, layer_selection=layer_selection, schedule=schedule,
                               score_metric=score_metric, rounding=rounding, protect_last_layer=protect_last_layer,
                               batch_size=batch_size, jitter=jitter, whitening=whitening, refit_steps=refit_steps,
                               refit_lr=refit_lr, embedding_share=spec.embedding_share if embedding_share is None
                               else embedding_share, exact_tokens=exact_tokens)
    started = time.perf_counter()
    model_hash = model_weights_hash(model)
    original_device = next(model.parameters()).device
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.to(device).eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    timer = _StageTimer(progress)
    try:
        plan = _make_plan(model, calib, method, spec, ratio, rho, options, timer)
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.to(original_device).train(was_training)
    plan.model_hash = model_hash
    if requested != method:
        plan.settings["method_requested"] = requested
        plan.settings["auto_rule"] = [list(rule) for rule in AUTO_METHODS]
    # Wall time is reported by the caller, not stored in plan.json (same inputs, same bytes).
    plan.elapsed_seconds = time.perf_counter() - started
    plan.attribute_stages = timer.stages()
    return plan


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


def _checked_options(spec: MethodSpec, refit_steps, refit_lr, **options) -> dict:
    """The method's options, every one checked before any pass over the data; refit defaults filled in."""
    if (options["layer_selection"] not in LAYER_SELECTIONS or options["schedule"] not in SCHEDULES
            or options["whitening"] not in WHITENINGS):
        raise EdgeCompressError(
            f"layer_selection must be one of {LAYER_SELECTIONS}, schedule one of {SCHEDULES}, "
            f"whitening one of {WHITENINGS}"
        )
    check_score_metric(options["score_metric"])
    if spec.refit:
        # refit_steps / refit_lr set the last scope (end-to-end when there is one); a layer-wise start keeps its own.
        scopes = spec.refit.split("+")
        steps_default, lr_default = KL_REFIT_DEFAULTS if spec.refit_loss == "kl" else REFIT_DEFAULTS[scopes[-1]]
        refit_steps = steps_default if refit_steps is None else refit_steps
        refit_lr = lr_default if refit_lr is None else refit_lr
        if refit_steps < 1 or not refit_lr > 0:
            raise EdgeCompressError(f"refit needs refit_steps >= 1 and refit_lr > 0, got {refit_steps}, {refit_lr}")
        options.update(refit_steps=refit_steps, refit_lr=refit_lr)
        if "layer" in scopes:
            layer_steps, layer_lr = (refit_steps, refit_lr) if scopes == ["layer"] else REFIT_DEFAULTS["layer"]
            options.update(refit_layer_steps=layer_steps, refit_layer_lr=layer_lr)
    return options


def _make_plan(model, calib, method, spec, ratio, rho, options, progress) -> CompressionPlan:
    layers = decoder_layers(model)
    dense_total = sum(p.numel() for p in model.parameters())
    scores = _layer_scores(model, calib, spec, options, progress)
    walker = LayerWalker(model, scores.stream) if scores is not None else None
    chosen_rho = embedding = None
    if spec.layers == "all":
        chosen = list(range(len(layers)))
        shapes = [(lin.out_features, lin.in_features) for layer in layers for lin in layer_linears(layer).values()]
        chosen_rho = rho = uniform_rho_for_ratio(shapes, dense_total, ratio)
    else:
        embedding = _embedding(model, calib, walker, ratio, dense_total, options)
        if embedding is not None:
            _report(progress, "embedding factors", 1, 1)
        layer_ratio = ratio if embedding is None or ratio is None else ratio - embedding[0].saving / dense_total
        chosen = _choose_layers(model, scores, spec, layer_ratio, rho, dense_total, options)
    _cache_chosen_inputs(model, walker, chosen, spec)
    _report(progress, "chosen layers' inputs", 1, 1)
    builder = _PlanBuilder(layer_prefix(model))
    if embedding is not None:
        builder.factors.update(embedding[1])
    removed = 0
    if spec.action == "remove":
        removed = sum(p.numel() for index in chosen for p in layers[index].parameters())
    elif spec.selection == "largest":
        _largest_sigma_layers(model, walker, chosen, spec, rho, builder, options, progress)
    else:
        _attribution_layers(model, walker, chosen, spec, rho, builder, options, progress)
    plan_scores = {}
    if spec.refit:
        plan_scores["refit"] = _refit(model, walker, chosen, builder, spec, options, calib, progress,
                                      embedding is not None)
    if scores is not None:
        plan_scores["block_influence"] = scores.block_influence
        if options["layer_selection"] == "angular" and spec.layers == "chosen":
            plan_scores["angular_distance"] = {"block_size": len(chosen), "values": scores.angular_distances(len(chosen))}
    settings = _settings(method, spec, ratio, rho if chosen_rho is None else None, options, chosen_rho)
    plan = _assemble_plan(model, calib, method, spec, chosen, builder, removed, plan_scores, settings, ratio,
                          dense_total)
    if embedding is not None:
        plan.embedding = embedding[0]
        plan.params.update(removed=plan.params["removed"] + embedding[0].saving)
        plan.params.update(after=dense_total - plan.params["removed"], achieved_ratio=plan.params["removed"] / dense_total)
    return plan


def _embedding(model, calib, walker, ratio, dense_total, options):
    """(EmbeddingPlan, factors) of the tied table for the method's share of the budget (at most half the ratio),
    from the calibration's token frequencies and the recorded final states; None without a share or a tie."""
    from edgecompress.attribution.embedding import factor_embedding, tied_embedding

    share = options["embedding_share"]
    if not share or ratio is None or walker is None:
        return None
    try:
        tied_embedding(model)
    except EdgeCompressError:  # an untied head: the method's share goes back to the layers
        options["embedding_share"] = 0.0
        return None
    share = min(share, ratio / 2)
    vocab, hidden = model.get_input_embeddings().weight.shape
    # At most an eighth of the vocabulary stays exact (smollm2's 49,152: the 2,048 asked; a tiny test vocabulary
    # keeps room to factor); a share the table cannot give at all goes back to the layers, as for an untied head.
    exact = min(options["exact_tokens"], max(1, vocab // 8))
    try:
        embedding_rank_for_share(vocab, hidden, dense_total, share, exact)
    except EdgeCompressError:
        options["embedding_share"] = 0.0
        return None
    states = walker.stream.final_states
    gram = sum((s.reshape(-1, s.shape[-1]).double().t() @ s.reshape(-1, s.shape[-1]).double()) for s in states)
    tokens = sum(s.shape[0] * s.shape[1] for s in states)
    return factor_embedding(model, calib.input_ids, share, exact, hidden_gram=gram, n_tokens=tokens)


def _cache_chosen_inputs(model, walker, chosen, spec) -> None:
    """Without the full dense cache, keep the chosen layers' dense inputs when they fit: every later stage
    (Gram matrices, refit targets, walks) then starts there instead of re-running the model from the bottom."""
    if walker is None or spec.action != "replace":
        return
    stream = walker.stream
    if stream.layer_inputs is not None and stream.layer_inputs[0][0].dtype != stream.embeddings[0].dtype:
        stream.keep_only(chosen, stream.embeddings[0].dtype)  # the float16 scoring cache: keep what is needed
    if stream.layer_inputs is not None:
        return
    per_layer = sum(h.numel() * h.element_size() for h in stream.embeddings)
    if per_layer * len(chosen) <= CHOSEN_INPUT_CACHE_BYTES:
        walker.cache_dense(chosen)


def _layer_scores(model, calib, spec, options, progress) -> LayerScores | None:
    """One recorded forward pass (BI, angular states, the layer stream), unless the method needs no data;
    every layer's input is cached when it fits (LAYER_INPUT_CACHE_BYTES)."""
    if spec.layers == "all" and spec.basis == "weight":
        return None
    input_ids = calib.input_ids.to(next(model.parameters()).device)
    stream_bytes = input_ids.numel() * model.config.hidden_size * 4 * len(decoder_layers(model))
    full = stream_bytes <= LAYER_INPUT_CACHE_BYTES
    half = not full and spec.action == "replace" and spec.layers == "chosen" and stream_bytes // 2 <= HALF_INPUT_CACHE_BYTES
    return layer_scores(
        model, input_ids, options["batch_size"],
        progress=lambda s, d, t: _report(progress, "layer scores", d, t),
        keep_inputs=spec.action == "replace" and (full or half), keep_dtype=torch.float16 if half else None,
    )


def _assemble_plan(model, calib, method, spec, chosen, builder, removed, plan_scores, settings, ratio, dense_total):
    layers = decoder_layers(model)
    action = "remove" if spec.action == "remove" else "replace"
    layer_plans = [
        LayerPlan(index=i, name=f"{builder.prefix}.{i}", action=action if i in chosen else "keep",
                  linears=sorted(builder.linears.get(i, []), key=lambda lin: lin.name))
        for i in range(len(layers))
    ]
    saved = removed + builder.saved
    return CompressionPlan(
        method=method,
        settings=settings,
        layers=layer_plans,
        scores=plan_scores,
        params={
            "dense_total": dense_total,
            "removed": saved,
            "after": dense_total - saved,
            "achieved_ratio": saved / dense_total,
            "target_ratio": ratio,
            "counts_embeddings": True,
        },
        model_hash="",
        calibration=calib.describe(),
        model={"architecture": type(model).__name__, "num_hidden_layers": len(layers), "layer_prefix": builder.prefix},
        factors=builder.factors,
    )
