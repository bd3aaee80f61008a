"""The fp16 artifact of a GPU target, chosen and validated on the build machine's CPU.

After the fusions (norms, attention, rotary: the exporter's fp32 upcasts would otherwise become fp16
squares), on the fused fp32 model:

1. scan: absmax of every float tensor over a few calibration windows (`activation_scan`);
2. block lists: a tensor whose absmax reaches the target's `[fp16] absmax_block` keeps its producer
   and its readers in fp32 (so it is never stored fp16); a graph output that would still be fp16
   (the KV cache) at or above 65504 rules fp16 out; decomposed norms whose input exceeds 256 are
   flagged. The additive attention mask holds finfo(float32).min on purpose: it is reported apart
   (the converter clamps it to -65504, still "minus infinity" for softmax);
3. convert (`passes.ConvertFloat16Pass`, logits kept fp32) and write the artifact; build its
   fp16-storage twin (`passes.EmulateFp16StoragePass`), which rounds like a GPU stores;
4. validate both against the fp32 export (`verify.half_precision_parity`, the target's
   `[verify.float16]` bounds), and escalate when parity fails: the lm_head in fp32, then bf16 where
   the target runs it; else a one-line failure with the measured numbers and the bounds.

The returned section is the report's `precision`: dtype, block lists, the scan table, each attempt and
the three checks. A bf16 artifact cannot run on onnxruntime's CPU provider (no bf16 MatMul, Add, Mul):
it is then validated through its bf16-storage twin only, and the report says so.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Callable

import onnx_ir as ir

from edgecompress import contract
from edgecompress.activation_scan import FP16_MAX, ActivationScan, scan_activations
from edgecompress.errors import VerificationError, first_line
from edgecompress.targets.profiles import Fp16Policy, TargetProfile

SCAN_WINDOWS = 4  # calibration windows scanned ...
SCAN_SEQ_LEN = 256  # ... of this many tokens: about a thousand tokens
HELD_OUT_WINDOWS = 1  # the next window: parity on text the scan did not see
DECOMPOSED_NORM_LIMIT = 256.0  # |x| above which x² overflows fp16
# Ops that pass the mask's values on unchanged (Where: as the value chosen where the mask applies).
_MASK_CARRIERS = {"Expand", "Reshape", "Unsqueeze", "Squeeze", "Slice", "Transpose", "Identity", "Where", "Cast",
                  "Concat"}


@dataclasses.dataclass
class Fp16Text:
    """Token windows for the scan and for held-out parity, and where they came from."""

    scan_windows: list[list[int]]
    held_out: list[list[int]]
    source: str


@dataclasses.dataclass
class Fp16Blocks:
    """What the scan decided: nodes kept fp32 (name -> reason) and what it found."""

    node_block_list: dict[str, str]
    hot: dict[str, float]  # tensor -> absmax at or above absmax_block (masks aside)
    masks: list[str]  # tensors that carry the additive mask's finfo.min
    overflow: list[str]  # fp16 graph outputs at or above 65504: fp16 impossible
    flags: list[str]  # decomposed norms with input absmax > 256


def scan_source(calibration: str | None):
    """The scan's text, resolved before the build starts (a missing file fails early): the user's
    `--calibration` (a self-generated one means the default order), else $EDGECOMPRESS_DATA's
    validation split or the `datasets` library; a NoText when there is none."""
    from edgecompress.options import is_self_spec
    from edgecompress.runtimes import text_sources

    return text_sources.resolve(None if is_self_spec(calibration) else calibration, text_sources.CALIBRATION)


def calibration_text(tokenizer: Any, source, fallback: list[int], warn: Callable[[str], None]) -> Fp16Text:
    """SCAN_WINDOWS + HELD_OUT_WINDOWS windows of SCAN_SEQ_LEN tokens from `source` (`scan_source`);
    with none, the verification text itself, with a warning."""
    from edgecompress.calibrate import _tokenize
    from edgecompress.runtimes import text_sources

    if isinstance(source, text_sources.NoText):
        warn(f"fp16 activation scan on the verification text only ({len(fallback)} tokens): {source.reason}")
        return Fp16Text([list(fallback)], [], "the verification prompt and its greedy continuation")
    wanted = (SCAN_WINDOWS + HELD_OUT_WINDOWS) * SCAN_SEQ_LEN
    ids = _tokenize(tokenizer, source.text[: wanted * 16])  # a prefix is enough: 16 characters a token is ample
    if len(ids) < wanted:
        ids = _tokenize(tokenizer, source.text)
    windows = [ids[start:start + SCAN_SEQ_LEN] for start in range(0, len(ids), SCAN_SEQ_LEN)]
    windows = [window for window in windows if len(window) == SCAN_SEQ_LEN] or [ids]
    scan, held_out = windows[:SCAN_WINDOWS], windows[SCAN_WINDOWS:SCAN_WINDOWS + HELD_OUT_WINDOWS]
    return Fp16Text(scan, held_out, f"{source.description}: the first {len(scan) + len(held_out)} windows of "
                                    f"{len(scan[0])} tokens ({len(held_out)} held out)")


def mask_tensors(graph: ir.Graph) -> set[str]:
    """Tensors holding the additive attention mask's huge constant: made by a node that reads a float
    constant beyond fp16's range, then carried unchanged (expanded, reshaped, selected)."""
    found: set[str] = set()
    for node in graph:
        constants = [v.const_value for v in node.inputs if v is not None and v.const_value is not None]
        if node.op_type == "Constant" or node.op_type == "ConstantOfShape":
            value = node.attributes.get("value")
            constants += [value.as_tensor()] if value is not None else []
        big = any(c.dtype == ir.DataType.FLOAT and c.size and abs(c.numpy()).max() >= FP16_MAX for c in constants)
        carried = node.op_type in _MASK_CARRIERS and any(v is not None and v.name in found for v in node.inputs)
        if (big and node.op_type in _MASK_CARRIERS | {"ConstantOfShape", "Constant"}) or carried:
            found.update(v.name for v in node.outputs if v.dtype == ir.DataType.FLOAT)
    return found


def plan_blocks(graph: ir.Graph, scan: ActivationScan, policy: Fp16Policy) -> Fp16Blocks:
    """The scan's node block list: every node that makes or reads a tensor at or above absmax_block."""
    from edgecompress.passes.convert_float16 import decomposed_norm_inputs

    masks = mask_tensors(graph)
    values = {v.name: v for node in graph for v in node.outputs}
    ranges = {name: peak for name, peak in scan.absmax.items() if name not in masks}
    hot = {name: peak for name, peak in scan.hot(policy.absmax_block).items() if name not in masks}
    blocked: dict[str, str] = {}
    for name, peak in sorted(hot.items(), key=lambda item: -item[1]):
        value = values.get(name)
        if value is None:
            continue
        producer = value.producer()
        if producer is not None:
            blocked.setdefault(producer.name, f"makes a tensor with absmax >= {policy.absmax_block:g}")
        for use in value.uses():
            blocked.setdefault(use.node.name, f"reads a tensor with absmax >= {policy.absmax_block:g}")
    outputs = {v.name for v in graph.outputs}
    overflow = [name for name, peak in ranges.items()
                if peak >= FP16_MAX and name in outputs and name not in policy.keep_io]
    flags = [f"decomposed norm {node}: input {x} has absmax {ranges[x]:.1f} > {DECOMPOSED_NORM_LIMIT:g}"
             for node, x in decomposed_norm_inputs(graph).items() if ranges.get(x, 0.0) > DECOMPOSED_NORM_LIMIT]
    return Fp16Blocks(blocked, hot, sorted(masks), sorted(overflow), flags)


@dataclasses.dataclass
class Attempt:
    name: str  # what the report calls this step
    half: str  # float16 | bfloat16
    extra_blocks: dict[str, str]


def attempts(graph: ir.Graph, profile: TargetProfile, fp16_possible: bool) -> list[Attempt]:
    """fp16; fp16 with the lm_head fp32 (the last MatMul, as onnxruntime's GPT-2 recipe); bf16 if the target
    runs it. With fp16 ruled out by the scan, bf16 only."""
    from edgecompress.passes.convert_float16 import lm_head_nodes

    steps = []
    if fp16_possible:
        steps.append(Attempt("float16", "float16", {}))
        head = lm_head_nodes(graph)
        if head:
            steps.append(Attempt("float16, lm_head fp32", "float16", {node.name: "escalation: lm_head in fp32"
                                                                        for node in head}))
    if profile.bf16_supported:
        steps.append(Attempt("bfloat16", "bfloat16", {}))
    return steps


def _save(model: ir.Model, folder: Path) -> None:
    from edgecompress.export import save_model

    for name in (contract.MODEL_FILE, contract.DATA_FILE):
        (folder / name).unlink(missing_ok=True)
    save_model(model, folder)


def _runs_here(folder: Path, session_kwargs: dict) -> str | None:
    """None if onnxruntime loads the artifact with these providers, else why not (one line)."""
    from edgecompress.runtimes.errors import RuntimeLoadError
    from edgecompress.runtimes.session import create_session

    from edgecompress.runtimes.decoder import kv_layout
    from edgecompress.runtimes.errors import ArtifactRuntimeError

    try:
        kv_layout(create_session(folder, **session_kwargs))  # a bfloat16 cache cannot be fed from numpy
    except (RuntimeLoadError, ArtifactRuntimeError) as exc:
        return first_line(exc)
    return None


def _short(result: dict[str, Any]) -> str:
    summary = result["summary"]
    if summary["mean_kl"] is None:
        return f"NaN/Inf {summary['nonfinite']}"
    return (f"mean KL {summary['mean_kl']:.3g}, top-1 {summary['top1_agreement']:.3f}, max |Δlogit| "
            f"{summary['max_abs_diff']:.3g}, NaN/Inf {summary['nonfinite']}")


def convert_and_validate(model: ir.Model, staging: Path, reference: Path, work: Path, text: Fp16Text,
                         verification_text: list[int], profile: TargetProfile, note: Callable[[str], None],
                         **session_kwargs) -> dict[str, Any]:
    """Scan, block, convert, validate, escalate: writes the artifact's model files into `staging` and returns
    the report's `precision` section. `model` is the fused fp32 model (consumed); `work` a scratch folder."""
    from edgecompress.passes.convert_float16 import fp32_required_nodes

    fused, twin = work / "fused-fp32", work / "fp16-storage-twin"
    twin.mkdir(parents=True, exist_ok=True)
    blocks, section = _scan(model, fused, text, profile.fp16, note, session_kwargs)
    required = fp32_required_nodes(model.graph)  # the pass adds these itself; listed here for the report
    steps = attempts(model.graph, profile, fp16_possible=not blocks.overflow)
    del model
    if blocks.overflow:
        section["attempts"].append({"step": "float16",
                                    "skipped": f"fp16 graph outputs reach 65504: {blocks.overflow[:3]}"})
    for attempt in steps:
        node_blocks = {**required, **blocks.node_block_list, **attempt.extra_blocks}
        parity, not_here = _attempt(attempt, node_blocks, fused, staging, twin, reference, verification_text, text,
                                    profile, note, section, session_kwargs)
        if parity["passed"]:
            _accept(section, attempt, parity, blocks, node_blocks, not_here)
            shutil.rmtree(fused, ignore_errors=True)
            return section
    raise _no_half_precision(section, profile)


def _scan(model: ir.Model, fused: Path, text: Fp16Text, policy: Fp16Policy, note, session_kwargs):
    """Save the fused fp32 model, scan its activations, decide the block lists; (blocks, the section so far)."""
    from edgecompress.passes.convert_float16 import fill_missing_float_types, name_nodes

    fused.mkdir(parents=True, exist_ok=True)
    fill_missing_float_types(model.graph)
    name_nodes(model.graph)  # the block lists and the scan name nodes the same way
    _save(model, fused)
    scan = scan_activations(fused / contract.MODEL_FILE, text.scan_windows, text.source, note, **session_kwargs)
    blocks = plan_blocks(model.graph, scan, policy)
    note(f"scan: {len(scan.absmax)} tensors over {scan.tokens} tokens; {len(blocks.hot)} at or above "
         f"{policy.absmax_block:g} -> {len(blocks.node_block_list)} nodes kept fp32")
    masks = set(blocks.masks)
    for row in scan.table(5, masks):
        note(f"  {row['tensor']} ({row['op']}): absmax {row['absmax']:.1f} = {row['ratio_to_fp16_max']:.3f} of 65504")
    section: dict[str, Any] = {
        "dtype": None,
        "keep_io": list(policy.keep_io),
        "absmax_block": policy.absmax_block,
        "scan": {**scan.describe(20, masks), "masks": {"tensors": len(blocks.masks), "note":
                 "the additive attention mask's finfo(float32).min, clamped to -65504 by the converter"},
                 "at_or_above_absmax_block": len(blocks.hot),
                 "max_absmax": max((v for k, v in scan.absmax.items() if k not in blocks.masks), default=0.0),
                 "overflow": blocks.overflow, "flags": blocks.flags},
        "attempts": [],
    }
    return blocks, section


def _attempt(attempt: Attempt, node_blocks: dict, fused: Path, staging: Path, twin: Path, reference: Path,
             verification_text: list[int], text: Fp16Text, profile: TargetProfile, note, section: dict,
             session_kwargs: dict):
    """One conversion, loaded once: the half artifact into `staging`, then (same model) its storage twin;
    both checked against the fp32 export. Appends the attempt's record; (parity, why it cannot run here)."""
    from edgecompress import graph_stages
    from edgecompress.verify import half_precision_parity

    note(f"convert: {attempt.name}")
    policy = profile.fp16
    candidate = graph_stages.load_model(fused)
    converted = graph_stages.run_stage(candidate, graph_stages.half_precision_passes(policy, node_blocks, attempt.half))
    _save(candidate, staging)
    graph_stages.run_stage(candidate, graph_stages.storage_twin_passes())
    _save(candidate, twin)
    del candidate
    not_here = _runs_here(staging, session_kwargs)
    parity = half_precision_parity(None if not_here else staging, twin, reference, verification_text,
                                   text.held_out, profile.verify.float16, note, **session_kwargs)
    if not_here:
        parity["artifact"] = {"skipped": f"the {attempt.half} artifact cannot run on this machine's onnxruntime "
                                         f"providers ({not_here}); validated through its storage twin only"}
    # Each attempt keeps the summaries; the accepted one's full checks go to section["checks"].
    section["attempts"].append({
        "step": attempt.name, "dtype": attempt.half, "passed": parity["passed"],
        "convert": converted["ConvertFloat16Pass"], "nodes_blocked": len(node_blocks),
        **{side: ({"summary": parity[side]["summary"]} if "summary" in parity[side] else parity[side])
           for side in ("artifact", "twin")}})
    note(f"{attempt.name}: artifact " + (_short(parity["artifact"]) if not not_here else "not run here")
         + f"; twin {_short(parity['twin'])}: {'passed' if parity['passed'] else 'failed'}")
    return parity, not_here


def _accept(section: dict, attempt: Attempt, parity: dict, blocks: Fp16Blocks, node_blocks: dict, not_here) -> None:
    scan = section["scan"]
    section.update(dtype=attempt.half, escalation=[a["step"] for a in section["attempts"]],
                   node_block_list=node_blocks, runs_on_build_machine=not not_here,
                   checks={"a_artifact_vs_fp32": parity["artifact"],
                           "b_activation_scan": {
                               "max_absmax": scan["max_absmax"],
                               "ratio_to_fp16_max": scan["max_absmax"] / FP16_MAX,
                               "nodes_kept_fp32_by_scan": len(blocks.node_block_list),
                               "overflow": blocks.overflow, "flags": blocks.flags,
                               "passed": not blocks.overflow or attempt.half == "bfloat16"},
                           "c_twin_vs_fp32": parity["twin"]})


def _no_half_precision(section: dict, profile: TargetProfile) -> VerificationError:
    bounds = profile.verify.float16
    tried = "; ".join(f"{a['step']}: " + (a.get("skipped") or
                      f"artifact {_short(a['artifact']) if 'summary' in a['artifact'] else 'not run here'}, "
                      f"twin {_short(a['twin'])}") for a in section["attempts"])
    return VerificationError(
        f"no half-precision artifact meets [verify.float16] (max_mean_kl {bounds.max_mean_kl:g}, min_top1_agreement "
        f"{bounds.min_top1_agreement:g}, max_abs_logit_delta {bounds.max_abs_logit_delta:g}); tried {tried}"
        + ("" if profile.bf16_supported else "; the target has no bf16"),
        {"precision": section},
    )
