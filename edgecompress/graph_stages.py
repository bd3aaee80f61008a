"""The graph stages of a build: which passes run, in which order, on one in-memory onnx-ir model.

- `plan_passes(plan, custom_ops)`: the compression plan's layer replacement (low-rank splits, then layer
  removal) and its factored tied embedding when it has one, on the fp32 export, before verification
  against PyTorch with the same plan applied; our
  `ai.edgecompress` ops that the target does not enable are lowered to standard ONNX right after;
- `optimize_passes(formats, gguf, fuse_low_rank)`: weight formats (exact GGUF blocks where they map, then
  round-to-nearest MatMulNBits for every other MatMul), the low-rank MatMul pairs fused into
  LowRankMatMul where the target enables it (after the weight formats: quantized factors stay
  MatMulNBits, skipped with that reason), then onnxruntime fusions; after that verification, and
  checked against the verified fp32 export;
- `half_precision_passes(policy, blocks, half)` and `storage_twin_passes()`: a GPU target's fp16 artifact and
  its fp16-storage twin, run by `half_precision.convert_and_validate` for each escalation attempt (one load
  of the fused fp32 model, the artifact saved, then the twin made from it in memory and saved).

`run_stage` runs one list with onnx-ir's pass infrastructure (each pass's requires/ensures) and
returns the report section: each pass's statistics by role, and, for a fusion stage, the expected
fusions that did not happen with the reason. The pipeline loads or exports once per stage and saves
once (edgecompress.export.save_model).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import onnx_ir as ir

from edgecompress.options import LOW_BIT_FORMATS, WeightFormats
from edgecompress.passes import (
    FactorEmbeddingPass,
    FuseGroupQueryAttentionPass,
    FuseLowRankPass,
    FuseOrtOpsPass,
    KeepLastLogitsPass,
    LowerCustomOpsPass,
    MapGgufWeightsPass,
    PackProjectionsPass,
    QuantizeWeightsPass,
    RemoveIdentityExpandsPass,
    ReplaceLayersPass,
    ShareKvBufferPass,
    StatsResult,
)
from edgecompress.passes.fuse_ort_ops import missing_fusions, op_type_counts

# Roles group a stage's passes in the report; the plan stage's single pass is reported at the top.
WEIGHTS, FUSION, CUSTOM_OPS = "weights", "fusion", "custom_ops"


@dataclasses.dataclass
class StageResult(ir.passes.PassResult):
    results: list[StatsResult] = dataclasses.field(default_factory=list)


class StagePasses(ir.passes.Sequential):
    """onnx-ir's Sequential, keeping every pass's result; user-facing errors pass through unwrapped
    (Sequential would wrap a PassInputError in a PassError and lose its one-line message)."""

    def call(self, model: ir.Model) -> StageResult:
        results = []
        for pass_ in self.passes:
            results.append(pass_(model))
            model = results[-1].model
        return StageResult(model, modified=any(result.modified for result in results), results=results)


def plan_passes(plan, custom_ops: tuple[str, ...] = ()) -> list[tuple[str | None, ir.passes.PassBase]]:
    """Apply a CompressionPlan: SplitLowRankPass then RemoveLayersPass, composed, and FactorEmbeddingPass when
    the plan factors the tied embedding; then lower the custom ops the target does not enable (`custom_ops`:
    the ones it does)."""
    from edgecompress.custom_ops import not_enabled

    passes: list[tuple[str | None, ir.passes.PassBase]] = [(None, ReplaceLayersPass.from_plan(plan))]
    if getattr(plan, "embedding", None) is not None:
        passes.append((None, FactorEmbeddingPass.from_plan(plan)))
    return passes + [(None, LowerCustomOpsPass(not_enabled(custom_ops)))]


def export_passes(plan, custom_ops: tuple[str, ...] = ()) -> list[tuple[str | None, ir.passes.PassBase]]:
    """What every export gets: KeepLastLogitsPass (the optional `logits_to_keep` input, default every position),
    then the plan's passes when there is a plan."""
    passes: list[tuple[str | None, ir.passes.PassBase]] = [(None, KeepLastLogitsPass())]
    return passes + (plan_passes(plan, custom_ops) if plan is not None else [])


def fuses_low_rank(custom_ops: tuple[str, ...], plan) -> bool:
    """Whether the optimize stage fuses low-rank pairs: the target runs LowRankMatMul and the plan splits."""
    from edgecompress.custom_ops import LOW_RANK_OP

    return LOW_RANK_OP in custom_ops and plan is not None and bool(plan.low_rank_linears())


def optimize_passes(formats: WeightFormats, gguf_blocks: dict | None = None, fuse_low_rank: bool = False,
                    rotary=None) -> list[tuple[str, ir.passes.PassBase]]:
    """Weight formats first (GGUF blocks kept exactly where they map), the low-rank pairs fused where
    `fuse_low_rank`, then onnxruntime fusions: GroupQueryAttention (rotary inside where `rotary`, the model's
    RotaryCaches, is given), sibling projections packed (q/k/v into its packed QKV, gate/up and a Split), the
    attention bias' per-layer copies dropped, and the KV cache made shareable in place."""
    passes: list[tuple[str, ir.passes.PassBase]] = []
    if formats.weights in LOW_BIT_FORMATS:
        if gguf_blocks:
            passes.append((WEIGHTS, MapGgufWeightsPass(gguf_blocks, accuracy_level=formats.accuracy_level)))
        bits = 4 if formats.weights == "int4" else 8
        passes.append((WEIGHTS, QuantizeWeightsPass(bits, formats.block_size, accuracy_level=formats.accuracy_level)))
    if fuse_low_rank:
        passes.append((CUSTOM_OPS, FuseLowRankPass()))
    if formats.fuse:
        passes += [(FUSION, FuseOrtOpsPass()), (FUSION, FuseGroupQueryAttentionPass(rotary)),
                   (FUSION, PackProjectionsPass()), (FUSION, RemoveIdentityExpandsPass()),
                   (FUSION, ShareKvBufferPass())]
    return passes


def half_precision_passes(policy, node_blocks: dict[str, str], half: str) -> list[tuple[None, ir.passes.PassBase]]:
    """A GPU target's fp16 (or bf16) artifact from the fused fp32 model: every float to `half` except the
    policy's I/O, op types and the nodes the activation scan (and an escalation) keep fp32."""
    from edgecompress.passes import ConvertFloat16Pass

    return [(None, ConvertFloat16Pass(policy.keep_io, policy.op_block_list, node_blocks, half=half))]


def storage_twin_passes() -> list[tuple[None, ir.passes.PassBase]]:
    """The half artifact's fp32 twin that rounds every stored tensor as the GPU stores it (validated on CPU)."""
    from edgecompress.passes import EmulateFp16StoragePass

    return [(None, EmulateFp16StoragePass())]


def run_stage(model: ir.Model, passes: list[tuple[str | None, ir.passes.PassBase]]) -> dict[str, Any]:
    """Run the passes in order on `model` (in place); the report section, passes grouped by role."""
    started = time.perf_counter()
    report: dict[str, Any] = {}
    if not passes:
        return report
    before = op_type_counts(model.graph)
    result = StagePasses(*(pass_ for _, pass_ in passes))(model)
    for (role, pass_), outcome in zip(passes, result.results):
        (report.setdefault(role, {}) if role else report)[type(pass_).__name__] = outcome.summary()
    if FUSION in report:  # weight passes add no fused op types, so the whole stage shows what fused
        gqa = report[FUSION].get(FuseGroupQueryAttentionPass.__name__, {})
        rotary_in_attention = gqa.get("fused", 0) > 0 and gqa.get("rotary_inside") == gqa.get("fused")
        report[FUSION]["missing"] = missing_fusions(before, op_type_counts(model.graph), rotary_in_attention)
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def load_model(folder: Path) -> ir.Model:
    """The saved fp32 export, weights memory-mapped from its data file (read only where a pass reads)."""
    from edgecompress.contract import MODEL_FILE

    return ir.load(str(folder / MODEL_FILE))
