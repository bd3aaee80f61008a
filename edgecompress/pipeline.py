"""The one place that knows the order of the stages:

  resolve and check everything → load → [calibrate → attribute | reuse a plan] → export → [passes]
  → save → [reference] → verify → [optimize → verify-optimized] → [evaluate] → write

Every stage takes plain inputs and returns a value; the graph stages run on one in-memory model and
save once. With an optimized build (int8/int4 weights or fusions) the verified fp32 export lives in a
hidden work folder beside OUT, read-only, as the reference of the optimized artifact, and is removed
afterwards; the artifact is assembled in a staging folder renamed into place only at the end.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from edgecompress import __version__, artifact, contract, custom_ops, models
from edgecompress.targets import profiles
from edgecompress.errors import EdgeCompressError
from edgecompress.progress import Progress
from edgecompress.runtimes.artifact_files import read_json
from edgecompress.options import (
    DEFAULT_EVAL_WINDOWS,
    EVAL_SEQ_LEN,
    BuildOptions,
    CompressOptions,
    LOW_BIT_FORMATS,
    WeightFormats,
    resolve_formats,
)
from edgecompress.methods import resolve_method
from edgecompress.targets.profiles import BUILT_DTYPES, TargetProfile


@dataclass
class StageClock:
    progress: Progress
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str) -> Iterator[Callable[[str], None]]:
        self.progress.stage_started(name)
        started = time.perf_counter()
        yield lambda message: self.progress.stage_note(name, message)
        self.timings[name] = round(time.perf_counter() - started, 2)
        self.progress.stage_finished(name, self.timings[name])

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.progress.warning(message)


@dataclass
class BuildInputs:
    """Everything resolved and checked before the first expensive step."""

    profile: TargetProfile
    formats: WeightFormats
    out: Path
    source: models.ModelSource
    saved_plan: Any  # a CompressionPlan to reuse, or None
    eval_windows: int  # windows for the report's perplexity; 0: no evaluation
    eval_text: Any  # a TextSource, a NoText (evaluation skipped, with the reason), or None (not asked)
    scan_text: Any = None  # fp16 builds: the activation scan's TextSource or NoText (half_precision.scan_source)


def default_out(model_spec: str | None, target: str) -> Path:
    stem = Path(model_spec or models.DEFAULT_MODEL).name
    stem = stem[: -len(".gguf")] if stem.endswith(".gguf") else stem
    return Path("out") / f"{stem.replace('/', '--')}-{target}"


def session_options(profile: TargetProfile) -> dict[str, Any]:
    """onnxruntime settings for verification and evaluation: the target's providers present here with their
    [provider_options] (strict SkipLayerNorm, no TF32: the parity settings), its threads, and our custom-op
    library where the target enables our ops (a graph that needs it and finds none was refused before)."""
    from edgecompress.custom_ops import session_libraries

    return {"providers": profile.session_providers(), "threads": profile.threads,
            "custom_op_libraries": session_libraries(profile.custom_ops)}


def build(options: BuildOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Build and verify one artifact. Everything is validated before the first expensive step."""
    clock = StageClock(progress or Progress())
    started = time.perf_counter()
    inputs = prepare(options)
    missing = [p for p in inputs.profile.execution_provider if p not in inputs.profile.providers]
    if missing:  # a GPU target built on a CPU machine: its checks run where they can, and say so
        clock.warn(f"this onnxruntime has no {', '.join(missing)}: verification and evaluation of the"
                   f" '{inputs.profile.name}' artifact run on {', '.join(inputs.profile.providers)}")
    with clock.stage("load") as note:
        note(f"{inputs.source.spec} ({inputs.source.kind})")
        loaded = models.load(inputs.source)
    compression, budget = budget_stage(clock, loaded, options, inputs)
    plan = plan_stage(clock, loaded, compression, inputs.saved_plan) if compression else None
    from edgecompress import graph_stages

    fuse_low_rank = graph_stages.fuses_low_rank(inputs.profile.custom_ops, plan)
    optimized = inputs.formats.optimized or fuse_low_rank
    with artifact.staged_folder(inputs.out, options.force, clock.warn) as staging:
        # The fp32 export is the artifact itself, or, for an optimized build, its read-only reference.
        export_folder = artifact.work_folder(staging, "fp32") if optimized else nullcontext(staging)
        with export_folder as fp32:
            export_info = export_stage(clock, loaded, plan, fp32, inputs.profile)
            verification = verify_stage(clock, fp32, loaded, plan, inputs.profile)
            if optimized:
                export_info["optimize"] = optimize_stage(clock, fp32, staging, inputs, loaded, verification,
                                                         fuse_low_rank)
                verification["optimized"] = verify_optimized_stage(clock, staging, fp32, loaded, verification, inputs,
                                                                   export_info["optimize"])
            evaluation = evaluate_stage(clock, staging, inputs, fp32 if optimized else None,
                                        export_info.get("optimize"))
        memory = budget.artifact_section(staging, export_info, clock.warn)
        report = write_stage(clock, staging, inputs, loaded, plan, export_info, verification, evaluation, memory, started)
    report["path"] = str(inputs.out)
    return report


def prepare(options: BuildOptions) -> BuildInputs:
    """Target, formats, destination, model source, compression options, evaluation text: refused early."""
    options.validate()
    profile = profiles.load_profile(options.target)
    if profile.dtype not in BUILT_DTYPES:
        raise EdgeCompressError(
            f"target '{profile.name}' asks for {profile.dtype} artifacts; this version builds {', '.join(BUILT_DTYPES)}"
        )
    formats = resolve_formats(options, profile)
    if profile.custom_ops and options.compress is not None:  # the compressed graph will use our ops
        custom_ops.library_file()
    out = Path(options.out) if options.out else default_out(options.model, profile.name)
    artifact.check_destination(out, options.force)
    source = models.resolve(options.model, options.revision, options.trust_remote_code)
    saved_plan = None
    if options.compress is not None and options.compress.plan is not None:
        from edgecompress.plan import CompressionPlan

        saved_plan = CompressionPlan.load(options.compress.plan)
    windows = options.eval_limit
    if windows is None:  # the default: compressed or low-bit builds are measured, plain fp32 ones equal PyTorch
        windows = DEFAULT_EVAL_WINDOWS if options.compress or formats.weights != "fp32" else 0
    eval_text = None
    if windows > 0:
        from edgecompress.runtimes import text_sources

        eval_text = text_sources.resolve(options.eval_data, text_sources.EVALUATION)
    scan_text = None
    if profile.dtype == "float16" or formats.weights == "fp16":
        from edgecompress.half_precision import scan_source

        settings = options.compress or options.auto_compress
        scan_text = scan_source(settings.calibration if settings else None)
    return BuildInputs(profile, formats, out, source, saved_plan, windows, eval_text, scan_text)


def budget_stage(clock: StageClock, loaded, options: BuildOptions, inputs: BuildInputs):
    """The memory budget: an explicit ratio or plan is checked against it; without one, a model that does not
    fit gets the smallest ratio that does. Returns the compression to run (or None) and the budget check."""
    from edgecompress.memory_budget import BudgetCheck

    with clock.stage("budget") as note:
        check = BudgetCheck.before_plan(loaded.model, options, inputs)
        note(check.summary())
    if check.picked_ratio is None:
        return options.compress, check
    if inputs.profile.custom_ops:  # the compressed graph will use our ops: refuse before compressing
        custom_ops.library_file()
    method = check.compression.method
    resolved = resolve_method(method, check.picked_ratio)
    method = method if resolved == method else f"{method} ({resolved})"
    clock.warn(f"{check.summary()}: compressing with {method} at ratio {check.picked_ratio:.2f}")
    if inputs.eval_windows == 0 and options.eval_limit is None:  # compressed builds are measured by default
        from edgecompress.runtimes import text_sources

        inputs.eval_windows = DEFAULT_EVAL_WINDOWS
        inputs.eval_text = text_sources.resolve(options.eval_data, text_sources.EVALUATION)
    return check.compression, check


def plan_stage(clock: StageClock, loaded, compression: CompressOptions, saved_plan):
    """Calibrate and attribute (PyTorch only), or check that a saved plan belongs to this model."""
    from edgecompress.plan import model_weights_hash

    if saved_plan is not None:
        with clock.stage("plan") as note:
            note(f"reusing {compression.plan}")
            saved_plan.verify_hash(model_weights_hash(loaded.model))
        return saved_plan
    from edgecompress.calibrate import build_calibration
    from edgecompress.compress import make_plan

    with clock.stage("calibrate") as note:
        note(f"{compression.calib_sequences} x {compression.calib_seq_len} tokens from "
             f"{compression.calibration or 'the default calibration text'}")
        calib = build_calibration(
            compression.calibration, loaded.tokenizer, compression.calib_sequences, compression.calib_seq_len,
            compression.seed, model=loaded.model, generation_config=loaded.generation_config, warn=clock.warn,
            device=compression.device, holdout=compression.calib_holdout,
        )
    with clock.stage("attribute") as note:

        def progress(stage: str, done: int, total: int) -> None:
            note(f"{compression.method}: {stage} {done}/{total}")

        return make_plan(
            loaded.model, calib, compression.method, compression.ratio, compression.rho, compression.device, progress,
            rounding=compression.rounding, structure=compression.structure, blocks=compression.blocks,
        )


def export_stage(clock: StageClock, loaded, plan, folder: Path, profile: TargetProfile) -> dict[str, Any]:
    """Trace to an in-memory graph, apply the plan's passes to it, and save it once with its sidecar files."""
    from edgecompress import export, graph_stages

    with clock.stage("export"):
        model, info = export.export_onnx(loaded.model)
    with clock.stage("passes") as note:
        if plan is not None:
            note(f"{len(plan.replaced_layers)} layers replaced, {len(plan.removed_layers)} removed")
        info["passes"] = graph_stages.run_stage(model, graph_stages.export_passes(plan, profile.custom_ops))
        if plan is not None:
            custom_ops.require(model)
    with clock.stage("save"):
        export.save_model(model, folder)
        info["kv_layers"] = export.kv_layers(model)  # after the plan's passes: layers a removal plan kept
        export.write_sidecar_files(folder, loaded, info["kv_layers"], profile)
        if plan is not None:
            plan.save(folder / contract.PLAN_DIR)
        carry_custom_ops(folder, model)
    return info


def carry_custom_ops(folder: Path, model) -> list[str]:
    """An artifact whose graph uses our ops carries the library and names it in genai_config.json."""
    from edgecompress import export

    used = custom_ops.used_ops(model)
    if used:
        custom_ops.copy_into(folder)
    else:  # copied over from the fp32 export, whose graph used them
        custom_ops.remove_from(folder)
    export.set_genai_custom_ops_library(folder, contract.CUSTOM_OPS_LIBRARY_FILE if used else None)
    return used


def verify_stage(clock: StageClock, folder: Path, loaded, plan, profile: TargetProfile) -> dict[str, Any]:
    """The fp32 export against PyTorch; for a compressed build, PyTorch with the same plan applied."""
    from edgecompress import verify

    if plan is not None:
        from edgecompress.apply_plan import apply_plan

        with clock.stage("reference") as note:
            note("PyTorch with the plan applied")
            apply_plan(loaded.model, plan, check_hash=False)
    with clock.stage("verify") as note:
        return verify.verify(folder, loaded.model, loaded.tokenizer, profile.verify, note, **session_options(profile))


def optimize_stage(clock: StageClock, fp32: Path, staging: Path, inputs: BuildInputs, loaded=None,
                   verification: dict | None = None, fuse_low_rank: bool = False) -> dict[str, Any]:
    """Low-bit weights (GGUF blocks kept exactly where they map), then fusions, then for a float16 target
    the scan, fp16 conversion and its validation (`half_precision`): one load, one save."""
    from edgecompress import export, graph_stages

    formats, source = inputs.formats, inputs.source
    with clock.stage("optimize") as note:
        gguf = None
        if formats.weights in LOW_BIT_FORMATS and source.gguf_file:
            from edgecompress.gguf_blocks import exact_blocks

            note(f"{formats.weights} weights (GGUF blocks kept exactly)")
            gguf = exact_blocks(Path(source.location) / source.gguf_file, formats.weights)
        else:
            note(f"{formats.weights} weights" + (", onnxruntime fusions" if formats.fuse else ""))
        model = graph_stages.load_model(fp32)
        rotary = export.rotary_caches(loaded.model) if formats.fuse and loaded is not None else None
        report = graph_stages.run_stage(model, graph_stages.optimize_passes(formats, gguf, fuse_low_rank, rotary))
        custom_ops.require(model)  # before the fp16 step's sessions need the library
        if is_half_precision(inputs):
            report["precision"] = half_precision_step(clock, note, model, fp32, staging, inputs, loaded,
                                                      verification)
        else:
            export.save_model(model, staging)
        artifact.copy_sidecar_files(fp32, staging)
        export.set_genai_share_buffer(staging, model.metadata_props.get(contract.SHARED_KV_BUFFER) == "1")
        report["custom_ops_used"] = carry_custom_ops(staging, model)
    return report


def is_half_precision(inputs: BuildInputs) -> bool:
    return inputs.profile.dtype == "float16" or inputs.formats.weights == "fp16"


def half_precision_step(clock: StageClock, note, model, fp32: Path, staging: Path, inputs: BuildInputs, loaded,
                        verification: dict) -> dict[str, Any]:
    """The fused fp32 model -> the fp16 artifact in `staging`, its twin and scan in a work folder; the
    fp32 export stays the reference. Returns the report's `precision` section."""
    from edgecompress import half_precision, verify

    text = verify.prompt_ids(loaded.tokenizer) + verification["greedy"]["onnxruntime"]
    windows = half_precision.calibration_text(loaded.tokenizer, inputs.scan_text, text, clock.warn)
    note(f"fp16: activation scan on {windows.source}")
    with artifact.work_folder(staging, "fp16") as work:
        section = half_precision.convert_and_validate(model, staging, fp32, work, windows, text, inputs.profile, note,
                                                      **session_options(inputs.profile))
    if len(section["escalation"]) > 1:
        clock.warn(f"fp16 escalated to '{section['escalation'][-1]}' after {', '.join(section['escalation'][:-1])} "
                   f"failed [verify.float16]" + ("" if section["runs_on_build_machine"] else
                                                 "; the artifact cannot run on this machine, only its twin was checked"))
    return section


def verify_optimized_stage(clock: StageClock, staging: Path, fp32: Path, loaded, verification: dict,
                           inputs: BuildInputs, optimize: dict | None = None) -> dict[str, Any]:
    from edgecompress import verify

    precision = (optimize or {}).get("precision")
    with clock.stage("verify-optimized") as note:
        if precision and not precision["runs_on_build_machine"]:  # a bf16 artifact on the CPU provider
            return verify.verify_checker_only(staging, f"the {precision['dtype']} artifact cannot run on this "
                                                       "machine's onnxruntime providers; see precision for its twin")
        result = verify.verify_optimized(
            staging, fp32, verify.prompt_ids(loaded.tokenizer), verification["greedy"]["onnxruntime"],
            inputs.formats.weights, inputs.profile, note, **session_options(inputs.profile),
        )
    level = result["greedy"].get("accuracy_level_0")
    if level is not None and not level["identical"]:
        clock.warn(f"MatMulNBits accuracy level {', '.join(map(str, level['levels']))} changes the greedy tokens from "
                   f"position {level['first_difference']} against level 0 (fp32 activations): the target's "
                   "accuracy_level = 0 keeps them, slower on CPU")
    return result


def evaluate_stage(clock: StageClock, staging: Path, inputs: BuildInputs, fp32: Path | None,
                   optimize: dict | None = None) -> dict[str, Any] | None:
    """Perplexity of the verified artifact through onnxruntime, when asked (default: compressed or
    low-bit builds), and of the fp32 export beside it when the graph was optimized after export."""
    from edgecompress.runtimes import text_sources

    limit = inputs.eval_windows
    if limit <= 0:
        return None
    precision = (optimize or {}).get("precision")
    if precision and not precision["runs_on_build_machine"]:
        return {"skipped": f"the {precision['dtype']} artifact cannot run on this machine's onnxruntime providers"}
    if isinstance(inputs.eval_text, text_sources.NoText):
        return {"skipped": f"{inputs.eval_text.reason}; pass --eval-data or set {text_sources.DATA_ENV} "
                           f"(or --eval-limit 0)"}
    from edgecompress.runtimes.perplexity import perplexity

    def measure(folder: Path) -> dict[str, Any]:
        result = perplexity(folder, inputs.eval_text, seq_len=EVAL_SEQ_LEN, limit=limit,
                            **session_options(inputs.profile))
        result.pop("artifact")  # a staging path, meaningless once renamed
        result.pop("window_nll")
        return result

    with clock.stage("evaluate") as note:
        note(f"perplexity on {inputs.eval_text.description}, {limit} windows of {EVAL_SEQ_LEN} tokens")
        result = measure(staging)
        if fp32 is not None:
            note("the same windows on the fp32 export")
            reference = measure(fp32)
            result["fp32_export"] = {"perplexity": reference["perplexity"], "seconds": reference.get("seconds")}
            result["ratio_to_fp32"] = round(result["perplexity"] / reference["perplexity"], 5)
    return result


def write_stage(clock: StageClock, staging: Path, inputs: BuildInputs, loaded, plan, export_info: dict,
                verification: dict, evaluation: dict | None, memory: dict, started: float) -> dict[str, Any]:
    """report.json: how it was built, verification, timings, and the manifest of every other file."""
    from edgecompress.report import machine_description, peak_rss_mb

    with clock.stage("write"):
        report = {
            "edgecompress": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": inputs.source.describe(),
            "model": loaded.info,
            "target": inputs.profile.describe(),
            "weights": inputs.formats.as_dict(),
            # fp16 targets: dtype, block lists, escalation and the three checks (moved out of export.optimize)
            "precision": (export_info.get("optimize") or {}).pop("precision", None),
            "export": export_info,
            "compression": _plan_summary(plan) if plan is not None else None,
            "memory": memory,
            "evaluation": evaluation,
            "verification": verification,
            "warnings": clock.warnings,
            "files": sorted(p.name for p in staging.iterdir()),
            "manifest": artifact.manifest(staging),
            "requirements": profiles.runtime_requirements(
                inputs.profile, read_json(staging, contract.CUSTOM_OPS_MANIFEST_FILE, required=False)),
        }
        report["size_bytes"] = sum(entry["bytes"] for entry in report["manifest"].values())
        report["timings_s"] = clock.timings
        report["total_seconds"] = round(time.perf_counter() - started, 2)
        report["peak_rss_mb"] = peak_rss_mb()
        report["machine"] = machine_description()
        (staging / contract.REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _plan_summary(plan) -> dict[str, Any]:
    data = plan.to_json_dict()
    data.pop("factors_file", None)
    stages = getattr(plan, "attribute_stages", None)  # set when this build made the plan (not a reused one)
    if stages:
        data["attribute_stages"] = stages
    return data
