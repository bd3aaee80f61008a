"""Every compression method as one typed entry: the stages it runs, in order, and the options they take.

A `Method` is made of typed stage choices, read top to bottom as the planner (compress.make_plan) runs them:
- `LayerChoice`: which decoder layers the method touches (the lowest-scored "chosen" ones, or "all") and what
  happens to them ("replace": low-rank/structured Linears; "remove": the whole layer);
- `FactorChoice` (replaced layers): the basis ("weight": SVD of W; "whitened": SVD of W L, SVD-LLM) and which
  singular groups stay ("largest" σ, or "attribution": GRASP's gradient scores, the budget split per matrix
  or "global"ly by score per parameter);
- `RefitChoice`: a short refit of the chosen layers' factors on calibration data ("layer", "end-to-end" on
  the final normed states or the dense logits), early-stopped on the held-out windows;
- `embedding_share`: the share of all parameters taken from a tied embedding before the layers get the rest.

`Method.stages` turns those choices into the ordered `Stage`s the planner runs; each stage names the home of
its function ("module:function", imported when it runs: this module imports no torch, so the options and the
CLI read it cheaply). `MethodOptions` holds the options every stage may read, with their checks.

Adding a method: one entry in METHODS (and, for a new algorithm, its stage function and a `FactorChoice`
naming it). The measurements behind each default are in the comments beside it.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Callable

from edgecompress import structures
from edgecompress.errors import EdgeCompressError

LAYER_SCOPES = ("chosen", "all")
LAYER_ACTIONS = ("replace", "remove")
BASES = ("weight", "whitened")
ALLOCATIONS = ("matrix", "global")
REFIT_SCOPES = ("layer", "end-to-end")
REFIT_LOSSES = ("hidden", "kl")
LAYER_SELECTIONS = ("bi", "angular")
SCHEDULES = ("sequential", "joint")
WHITENINGS = ("original", "compressed")
SCORE_METRICS = ("taylor", "gradient")  # |sigma * G| (GRASP) or |G|
# (steps, learning rate) per refit scope, measured on smollm2-135m at 10 % (10 windows): layer-wise
# 64 steps at 1e-4 / 5e-4 and 128 at 1e-3 gave 53.8 / 52.4 / 51.2 from grasp-w's 58.4; end-to-end
# 64 steps at 5e-4 gave 48.6.
REFIT_DEFAULTS = {"layer": (128, 1e-3), "end-to-end": (64, 5e-4)}
# The logit (KL) refit at most 128 steps, early-stopped on held-out windows: on smollm2-135m at 20 % with
# 128 + 8 windows the held-out KL still fell at step 128 (0.475 -> 0.363), and 5e-4 beat 1e-3 on it (0.382;
# bench/results/refit-lr.json).
KL_REFIT_DEFAULTS = (128, 5e-4)


@dataclass(frozen=True)
class Stage:
    """One step of the planner: a label and the home of its function, `function(state) -> None`."""

    name: str
    home: str  # "module:function"

    def function(self) -> Callable:
        module, attribute = self.home.split(":")
        return getattr(importlib.import_module(module), attribute)


_CHOICE = "edgecompress.attribution.layer_choice"
SCORE_LAYERS = Stage("layer scores", f"{_CHOICE}:score_layers")
EMBEDDING_BUDGET = Stage("embedding budget", "edgecompress.attribution.embedding_stage:embedding_budget")
FACTOR_EMBEDDING = Stage("embedding factors", "edgecompress.attribution.embedding_stage:factor_embedding")
CHOOSE_LAYERS = Stage("choose layers", f"{_CHOICE}:choose_layers")
CACHE_CHOSEN_INPUTS = Stage("chosen layers' inputs", f"{_CHOICE}:cache_chosen_inputs")
REMOVE_LAYERS = Stage("remove layers", f"{_CHOICE}:remove_layers")
REFIT = Stage("refit", "edgecompress.attribution.refit_stage:refit_factors")
# The factor stage of each selection rule; a new rule names its own function in its FactorChoice.
FACTOR_STAGES = {
    "largest": Stage("factors", "edgecompress.attribution.factor_choice:largest_sigma_factors"),
    "attribution": Stage("factors", "edgecompress.attribution.factor_choice:attributed_factors"),
}


def _one_of(value, allowed, what: str):
    if value not in allowed:
        raise EdgeCompressError(f"{what} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return value


@dataclass(frozen=True)
class LayerChoice:
    scope: str = "chosen"  # "chosen": the most redundant layers by score | "all"
    action: str = "replace"  # "replace" (low-rank Linears) | "remove" (the whole layer)

    def __post_init__(self):
        _one_of(self.scope, LAYER_SCOPES, "a method's layer scope")
        _one_of(self.action, LAYER_ACTIONS, "a method's layer action")


@dataclass(frozen=True)
class FactorChoice:
    basis: str = "weight"  # "weight": SVD of W | "whitened": SVD of W L (SVD-LLM)
    selection: str = "largest"  # "largest" singular values | "attribution" (gradient scores, GRASP) | a new rule
    # How attribution splits the replaced layers' budget: each matrix at rho ("matrix"), or the groups with the
    # best score per parameter across all matrices scored together ("global", same total parameters).
    allocation: str = "matrix"
    stage: Stage | None = None  # a new selection rule's function; None: FACTOR_STAGES[selection]

    def __post_init__(self):
        _one_of(self.basis, BASES, "a method's basis")
        _one_of(self.allocation, ALLOCATIONS, "a method's allocation")
        if self.stage is None:
            _one_of(self.selection, tuple(FACTOR_STAGES), "a method's selection without its own stage")

    @property
    def factor_stage(self) -> Stage:
        return self.stage or FACTOR_STAGES[self.selection]

    @property
    def projects_weights(self) -> bool:
        """Largest-σ factors are projections of the weight, which a Monarch / BLAST structure can replace."""
        return self.selection == "largest"


@dataclass(frozen=True)
class RefitChoice:
    scopes: tuple[str, ...]  # ("layer",), ("end-to-end",) or ("layer", "end-to-end"): the first starts the second
    loss: str = "hidden"  # end-to-end objective: "hidden" (final normed states, MSE) | "kl" (logits)

    def __post_init__(self):
        if not self.scopes or any(scope not in REFIT_SCOPES for scope in self.scopes):
            raise EdgeCompressError(f"a refit's scopes must be taken from {', '.join(REFIT_SCOPES)}, got {self.scopes!r}")
        _one_of(self.loss, REFIT_LOSSES, "a refit's loss")

    @property
    def label(self) -> str:
        return "+".join(self.scopes)

    def defaults(self) -> tuple[int, float]:
        """(steps, learning rate) of the last scope, which refit_steps / refit_lr set."""
        return KL_REFIT_DEFAULTS if self.loss == "kl" else REFIT_DEFAULTS[self.scopes[-1]]


@dataclass(frozen=True)
class Method:
    summary: str  # one line for --help
    layers: LayerChoice = field(default_factory=LayerChoice)
    factors: FactorChoice | None = None  # None exactly when the layers are removed
    refit: RefitChoice | None = None
    # Share of ALL parameters taken from a tied embedding (frequency-weighted, output-whitened factors with
    # the most frequent tokens exact; attribution/embedding.py) before the layers get the rest of the budget.
    embedding_share: float = 0.0

    def __post_init__(self):
        if (self.factors is None) != (self.layers.action == "remove"):
            raise EdgeCompressError("a method that replaces layers needs a FactorChoice, and one that removes them none")
        if self.refit is not None and self.factors is None:
            raise EdgeCompressError("a refit needs factors: a method that removes layers cannot refit")

    @property
    def stages(self) -> tuple[Stage, ...]:
        """What the planner runs, in order (a stage with nothing to do for the options returns at once)."""
        stages = [SCORE_LAYERS]
        chosen = self.layers.scope == "chosen"
        if chosen:
            stages.append(EMBEDDING_BUDGET)  # before the layers: they get the rest of the budget
        stages += [CHOOSE_LAYERS, CACHE_CHOSEN_INPUTS]
        if chosen:
            stages.append(FACTOR_EMBEDDING)  # after the per-layer cache is trimmed to the chosen layers
        stages.append(REMOVE_LAYERS if self.factors is None else self.factors.factor_stage)
        if self.refit is not None:
            stages.append(REFIT)
        return tuple(stages)

    def settings(self) -> dict:
        """How plan.json records the method's choices."""
        replace = self.factors is not None
        return {"layer_choice": self.layers.scope, "layer_action": self.layers.action,
                "basis": self.factors.basis if replace else None, "selection": self.factors.selection if replace else None}


_WHITENED = FactorChoice("whitened", "largest")
_KL_REFIT = RefitChoice(("layer", "end-to-end"), "kl")
METHODS = {
    "grasp": Method("GRASP: gradient-scored singular groups", factors=FactorChoice("weight", "attribution")),
    "grasp-w": Method("SVD-LLM's whitened factors in GRASP's layers", factors=_WHITENED),
    "grasp-wr": Method("grasp-w plus a short layer-wise refit of the factors", factors=_WHITENED,
                       refit=RefitChoice(("layer",))),
    "grasp-wre": Method("grasp-w plus an end-to-end refit (slower)", factors=_WHITENED,
                        refit=RefitChoice(("end-to-end",))),
    "grasp-wrk": Method("grasp-wr, then an end-to-end refit on the dense model's logits (KL)", factors=_WHITENED,
                        refit=_KL_REFIT, embedding_share=0.05),
    "grasp-wtk": Method("gradient-scored whitened groups, the budget split across matrices by score, then "
                        "layer-wise and logit (KL) refits", factors=FactorChoice("whitened", "attribution", "global"),
                        refit=_KL_REFIT, embedding_share=0.05),
    "grasp-wt": Method("gradient-scored groups in the whitened basis", factors=FactorChoice("whitened", "attribution")),
    "grasp-topsigma": Method("ablation: GRASP's layers, largest sigma", factors=FactorChoice("weight", "largest")),
    "shortgpt": Method("remove the lowest-Block-Influence layers", LayerChoice("chosen", "remove")),
    "svd": Method("plain SVD of every Linear", LayerChoice("all"), FactorChoice("weight", "largest")),
    "svd-llm": Method("SVD-LLM: whitened SVD of every Linear", LayerChoice("all"), _WHITENED),
}
# The default: the method that kept the most quality at each ratio on bench/quality.py (smollm2-135m,
# WikiText-2, rows in bench/results/quality.json), chosen by ratio; the plan records what it resolved to.
AUTO = "auto"
AUTO_METHODS = ((1.0, "grasp-wrk"),)  # (ratio up to, method), first match


def method_help() -> str:
    auto = ", ".join(f"{name} up to {limit:g}" for limit, name in AUTO_METHODS)
    return f"{AUTO} (the default: by ratio, {auto}); " + "; ".join(
        f"{name} ({method.summary})" for name, method in METHODS.items())


def resolve_method(method: str, ratio: float | None) -> str:
    """`auto` -> the method measured best at `ratio` (AUTO_METHODS); any other name is returned checked."""
    if method != AUTO:
        check_method(method)
        return method
    ratio = 0.0 if ratio is None else ratio
    return next((name for limit, name in AUTO_METHODS if ratio <= limit), AUTO_METHODS[-1][1])


def check_method(method: str) -> Method:
    if method == AUTO:
        return METHODS[resolve_method(AUTO, None)]
    if method not in METHODS:
        raise EdgeCompressError(f"unknown method '{method}'; use one of {AUTO}, {', '.join(METHODS)}")
    return METHODS[method]


def check_score_metric(metric: str) -> str:
    if metric not in SCORE_METRICS:
        raise EdgeCompressError(f"unknown score metric {metric!r}; use one of {', '.join(SCORE_METRICS)}")
    return metric


@dataclass
class MethodOptions:
    """The options a method's stages read; `checked` refuses bad ones before any pass over the data."""

    structure: str = structures.LOWRANK.name  # what replaced Linears become: lowrank | monarch | blast
    blocks: int | None = None  # Monarch/BLAST blocks (None: options.DEFAULT_BLOCKS for those)
    n_layers: int | None = None  # a fixed layer count instead of the ratio's
    layer_selection: str = "bi"
    schedule: str = "joint"  # one gradient pass over all chosen layers: 5x faster, same quality here
    score_metric: str = "taylor"
    rounding: str = "nearest"
    protect_last_layer: bool = False
    batch_size: int = 1
    jitter: float = 1e-6
    whitening: str = "original"
    embedding_share: float = 0.0
    exact_tokens: int = 2048  # tokens whose embedding rows stay exact (the most frequent in the calibration)
    # Refit steps and learning rate of the last scope, and of a layer-wise start: None without a refit.
    refit_steps: int | None = None
    refit_lr: float | None = None
    refit_layer_steps: int | None = None
    refit_layer_lr: float | None = None

    def checked(self, method: Method) -> "MethodOptions":
        """Every option checked; the refit's defaults filled in for a method that refits, cleared otherwise."""
        if (self.layer_selection not in LAYER_SELECTIONS or self.schedule not in SCHEDULES
                or self.whitening not in WHITENINGS):
            raise EdgeCompressError(
                f"layer_selection must be one of {LAYER_SELECTIONS}, schedule one of {SCHEDULES}, "
                f"whitening one of {WHITENINGS}"
            )
        check_score_metric(self.score_metric)
        steps, lr = self.refit_steps, self.refit_lr
        self.refit_steps = self.refit_lr = self.refit_layer_steps = self.refit_layer_lr = None
        if method.refit is None:
            return self
        steps_default, lr_default = method.refit.defaults()
        steps = steps_default if steps is None else steps
        lr = lr_default if lr is None else lr
        if steps < 1 or not lr > 0:
            raise EdgeCompressError(f"refit needs refit_steps >= 1 and refit_lr > 0, got {steps}, {lr}")
        self.refit_steps, self.refit_lr = steps, lr
        if "layer" in method.refit.scopes:  # a layer-wise start keeps its own defaults
            alone = method.refit.scopes == ("layer",)
            self.refit_layer_steps, self.refit_layer_lr = (steps, lr) if alone else REFIT_DEFAULTS["layer"]
        return self

    def settings(self) -> dict:
        """As plan.json records them: sorted, the refit's only for a method that refits."""
        values = asdict(self)
        return {key: values[key] for key in sorted(values) if not (key.startswith("refit") and values[key] is None)}
