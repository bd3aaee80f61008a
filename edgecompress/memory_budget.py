"""Memory budget: weights + KV cache at a context + workspace must fit what the target lets a model use.

Before any expensive step, the build estimates the dense artifact's memory from the model's parameter
counts and the weight format; when it does not fit and no `--ratio` was given, the smallest
compression ratio that fits is picked (compression removes Linear parameters, so the estimate takes
the bytes per Linear parameter of the format). After the build the same arithmetic is done with the
artifact's real file sizes. Everything is in GB of 10^9 bytes. Torch-free except `model_shape`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from edgecompress.errors import EdgeCompressError

GB = 1e9
MAX_BUDGET_RATIO = 0.5  # beyond half the parameters our methods lose too much quality to pick it silently
COMPUTE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the memory arithmetic needs from a model."""

    params: int  # every parameter once (a tied lm_head is the embedding)
    linear_params: int  # decoder-layer Linear weights and biases: what compression removes
    embedding_params: int
    lm_head_tied: bool
    num_layers: int
    kv_heads: int
    head_dim: int
    max_context: int  # the model's max_position_embeddings


def model_shape(model) -> ModelShape:
    """Parameter counts and KV geometry of a loaded Hugging Face decoder."""
    import torch

    from edgecompress.export import kv_geometry

    config = model.config
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    linear = sum(p.numel() for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                 and module is not head for p in module.parameters(recurse=False))
    layers, kv_heads, head_dim = kv_geometry(config)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    return ModelShape(params, linear, embedding.numel(), tied, layers, kv_heads, head_dim,
                      int(getattr(config, "max_position_embeddings", 2048)))


def linear_bytes_per_param(weights: str, block_size: int) -> float:
    """Bytes one Linear parameter costs in the artifact: MatMulNBits adds an fp32 scale and a zero point per block."""
    if weights in ("fp32", "fp16"):
        return {"fp32": 4.0, "fp16": 2.0}[weights]
    bits = {"int8": 8, "int4": 4}[weights]
    return bits / 8 + (4 + bits / 8) / block_size


def weights_bytes(shape: ModelShape, weights: str, block_size: int, dtype: str, removed_params: int = 0) -> float:
    """Estimated weight bytes after `removed_params` Linear parameters are gone.

    Low-bit formats quantize the Linear layers and the lm_head (a tied one gets its own quantized copy);
    embeddings and norms stay in the compute dtype."""
    per_linear = linear_bytes_per_param(weights, block_size)
    other = shape.params - shape.linear_params
    if weights in ("fp32", "fp16"):
        return (shape.params - removed_params) * per_linear
    head = shape.embedding_params * per_linear if shape.lm_head_tied else 0.0
    if not shape.lm_head_tied:  # an untied lm_head is a Linear of its own, quantized, not in linear_params
        other -= shape.embedding_params
        head = shape.embedding_params * per_linear
    return other * COMPUTE_BYTES[dtype] + (shape.linear_params - removed_params) * per_linear + head


def kv_dtype(profile, weights: str) -> str:
    """The artifact's KV cache dtype: float16 in fp16 artifacts unless `[fp16] keep_io` keeps the cache fp32."""
    from edgecompress.contract import is_kv_name

    half = weights == "fp16" or profile.dtype == "float16"
    return "float16" if half and not any(is_kv_name(name) for name in profile.fp16.keep_io) else "float32"


def kv_cache_bytes(num_layers: int, kv_heads: int, head_dim: int, context: int, dtype: str, batch: int = 1) -> float:
    """Keys and values of every layer at `context` tokens."""
    from edgecompress.contract import kv_cache_bytes as contract_bytes

    return float(contract_bytes(num_layers, kv_heads, head_dim, context, COMPUTE_BYTES[dtype], batch))


@dataclass(frozen=True)
class MemoryNeed:
    weights_gb: float
    kv_cache_gb: float
    workspace_gb: float

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.kv_cache_gb + self.workspace_gb

    def as_dict(self) -> dict[str, float]:
        data = {key: round(value, 6) for key, value in asdict(self).items()}
        data["total_gb"] = round(self.total_gb, 6)
        return data

    def text(self) -> str:
        return (f"weights {self.weights_gb:.3f} + KV cache {self.kv_cache_gb:.3f} + workspace "
                f"{self.workspace_gb:.3f} = {self.total_gb:.3f} GB")


@dataclass(frozen=True)
class Budget:
    """The limit a build is checked against, and where each number came from."""

    budget_gb: float
    budget_source: str  # "--max-memory" or "target <name>"
    context: int
    context_source: str  # "--context", "target <name>" or "the model's max_position_embeddings"

    @classmethod
    def resolve(cls, profile, shape: ModelShape, max_memory_gb: float | None, context: int | None) -> "Budget":
        if max_memory_gb is not None:
            budget, budget_source = float(max_memory_gb), "--max-memory"
        elif profile.budget_gb is not None:
            budget, budget_source = float(profile.budget_gb), f"target {profile.name}"
        else:
            budget, budget_source = math.inf, "none (the target sets no memory)"
        if context is not None:
            if context > shape.max_context:
                raise EdgeCompressError(f"--context {context} exceeds the model's maximum context {shape.max_context}")
            ctx, ctx_source = context, "--context"
        elif profile.max_context is not None:
            ctx, ctx_source = min(profile.max_context, shape.max_context), f"target {profile.name}"
        else:
            ctx, ctx_source = shape.max_context, "the model's max_position_embeddings"
        return cls(budget, budget_source, ctx, ctx_source)

    def need(self, shape: ModelShape, formats, profile, removed_params: int = 0) -> MemoryNeed:
        return MemoryNeed(
            weights_bytes(shape, formats.weights, formats.block_size, profile.dtype, removed_params) / GB,
            kv_cache_bytes(shape.num_layers, shape.kv_heads, shape.head_dim, self.context,
                           kv_dtype(profile, formats.weights)) / GB,
            profile.workspace_gb,
        )

    def describe(self) -> dict[str, Any]:
        return {"budget_gb": None if math.isinf(self.budget_gb) else self.budget_gb, "budget_source": self.budget_source,
                "context": self.context, "context_source": self.context_source, "units": "GB of 10^9 bytes"}


def pick_ratio(budget: Budget, shape: ModelShape, formats, profile) -> tuple[float | None, dict[str, Any]]:
    """None when the dense model fits; else the smallest ratio (in hundredths) that fits; refused when none does."""
    dense = budget.need(shape, formats, profile)
    section = {**budget.describe(), "dense_estimate": dense.as_dict()}
    if dense.total_gb <= budget.budget_gb:
        return None, {**section, "picked_ratio": None, "reason": "the dense model fits"}
    fixed = dense.kv_cache_gb + dense.workspace_gb
    if fixed >= budget.budget_gb:
        raise EdgeCompressError(
            f"no compression ratio fits {budget.budget_gb:g} GB: the KV cache at {budget.context} tokens and the "
            f"workspace alone need {fixed:.3f} GB (dense: {dense.text()}); use a smaller --context or --max-memory")
    per_param = linear_bytes_per_param(formats.weights, formats.block_size)
    removed = math.ceil((dense.total_gb - budget.budget_gb) * GB / per_param)
    ratio = math.ceil(100 * removed / shape.params) / 100  # hundredths, rounded up: never short of the budget
    if ratio > MAX_BUDGET_RATIO or removed > shape.linear_params:
        raise EdgeCompressError(
            f"no supported ratio fits {budget.budget_gb:g} GB at {budget.context} tokens: dense {dense.text()} needs "
            f"ratio {removed / shape.params:.2f} > {MAX_BUDGET_RATIO}; use a smaller --context, --weights int4, or a larger budget")
    picked = budget.need(shape, formats, profile, removed_params=round(ratio * shape.params))
    return ratio, {**section, "picked_ratio": ratio, "estimate": picked.as_dict(),
                   "reason": f"dense needs {dense.total_gb:.3f} GB > {budget.budget_gb:g} GB"}


def check_fits(budget: Budget, shape: ModelShape, formats, profile, ratio: float) -> dict[str, Any]:
    """An explicit --ratio: refused before the plan when its estimate does not fit."""
    need = budget.need(shape, formats, profile, removed_params=round(ratio * shape.params))
    if need.total_gb > budget.budget_gb:
        raise EdgeCompressError(f"--ratio {ratio} does not fit {budget.budget_gb:g} GB ({budget.budget_source}) at "
                                f"{budget.context} tokens: {need.text()}")
    return {**budget.describe(), "dense_estimate": budget.need(shape, formats, profile).as_dict(),
            "picked_ratio": None, "estimate": need.as_dict(), "reason": "--ratio given"}


def artifact_need(budget: Budget, weights_file_bytes: int, kv_layers: int, shape: ModelShape, profile,
                  weights: str) -> MemoryNeed:
    """The built artifact: its real weight bytes (both files: the graph's own constants load too), the KV
    cache of the layers it kept."""
    kv = kv_cache_bytes(kv_layers, shape.kv_heads, shape.head_dim, budget.context, kv_dtype(profile, weights))
    return MemoryNeed(weights_file_bytes / GB, kv / GB, profile.workspace_gb)


class BudgetCheck:
    """The build's memory check: before the plan (estimates, maybe a picked ratio) and on the artifact."""

    def __init__(self, shape: ModelShape, budget: Budget, section: dict[str, Any], profile, weights: str,
                 picked_ratio: float | None = None, compression=None):
        self.shape, self.budget, self.section, self.profile, self.weights = shape, budget, section, profile, weights
        self.picked_ratio, self.compression = picked_ratio, compression

    @classmethod
    def before_plan(cls, model, options, inputs) -> "BudgetCheck":
        import dataclasses

        from edgecompress.options import CompressOptions

        shape, profile, formats = model_shape(model), inputs.profile, inputs.formats
        budget = Budget.resolve(profile, shape, options.max_memory_gb, options.context)
        if options.compress is None:
            ratio, section = pick_ratio(budget, shape, formats, profile)
            compression = None
            if ratio is not None:
                compression = dataclasses.replace(options.auto_compress or CompressOptions(), ratio=ratio,
                                                  rounding="at_least")
            return cls(shape, budget, section, profile, formats.weights, ratio, compression)
        ratio = options.compress.ratio
        if inputs.saved_plan is not None:
            ratio = inputs.saved_plan.params["achieved_ratio"]
        return cls(shape, budget, check_fits(budget, shape, formats, profile, ratio), profile, formats.weights)

    def summary(self) -> str:
        limit = "no limit" if math.isinf(self.budget.budget_gb) else f"{self.budget.budget_gb:g} GB"
        need = self.section.get("estimate") or self.section["dense_estimate"]
        what = "dense" if "estimate" not in self.section else "compressed"
        return f"{what} estimate {need['total_gb']:.3f} GB at {self.budget.context} tokens, budget {limit} ({self.budget.budget_source})"

    def artifact_section(self, folder, export_info: dict, warn) -> dict[str, Any]:
        """The report's `memory`: the estimate, then the artifact's own weight bytes and KV layers."""
        from edgecompress.contract import DATA_FILE, MODEL_FILE

        weights = sum((folder / name).stat().st_size for name in (MODEL_FILE, DATA_FILE) if (folder / name).exists())
        need = artifact_need(self.budget, weights, export_info["kv_layers"], self.shape, self.profile, self.weights)
        fits = need.total_gb <= self.budget.budget_gb
        if not fits:
            warn(f"the artifact needs {need.text()}, over the {self.budget.budget_gb:g} GB budget ({self.budget.budget_source})")
        return {**self.section, "artifact": need.as_dict(), "fits": fits}
