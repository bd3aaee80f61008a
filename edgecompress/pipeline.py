"""The one place that knows the order of the stages: resolve → load → export → verify → write."""

from __future__ import annotations

import json
import platform
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from edgecompress import __version__, artifact, models, profiles
from edgecompress.errors import EdgeCompressError


class Progress:
    """What the pipeline tells the outside world. The CLI renders it; the API default is silent."""

    def stage_started(self, name: str) -> None: ...

    def stage_note(self, name: str, message: str) -> None: ...

    def stage_finished(self, name: str, seconds: float) -> None: ...


@dataclass
class CompressOptions:
    """How to compress; the plan it leads to is saved in the artifact's plan/ folder."""

    method: str = "grasp"
    ratio: float | None = None  # fraction of ALL parameters removed, embeddings included
    plan: Path | None = None  # reuse a saved plan: skips calibration and attribution
    calibration: str | None = None  # text file, hf:dataset spec; default WikiText-2 validation
    calib_sequences: int = 16
    calib_seq_len: int = 512
    seed: int = 0
    rho: float = 0.9
    device: str = "cpu"


@dataclass
class BuildOptions:
    model: str | None = None
    target: str | None = None
    out: Path | None = None
    force: bool = False
    revision: str | None = None
    trust_remote_code: bool = False
    compress: CompressOptions | None = None
    # WikiText-2 test windows for the artifact's perplexity in the report; None: 40 for compressed or
    # low-bit builds and none for plain fp32 ones; 0: never.
    eval_limit: int | None = None
    weights: str | None = None  # fp32 | int8 | int4; None: the target's default
    block_size: int | None = None  # MatMulNBits block along K; None: the target's default
    fuse: bool | None = None  # onnxruntime contrib-op fusions; None: the target's default


@dataclass
class StageClock:
    progress: Progress
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[Callable[[str], None]]:
        self.progress.stage_started(name)
        started = time.perf_counter()
        yield lambda message: self.progress.stage_note(name, message)
        self.timings[name] = round(time.perf_counter() - started, 2)
        self.progress.stage_finished(name, self.timings[name])


def default_out(model_spec: str | None, target: str) -> Path:
    stem = Path(model_spec or models.DEFAULT_MODEL).name
    stem = stem[: -len(".gguf")] if stem.endswith(".gguf") else stem
    return Path("out") / f"{stem.replace('/', '--')}-{target}"


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def machine() -> dict[str, Any]:
    import os

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def build(options: BuildOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Build and verify one artifact. Everything is validated before the first expensive step."""
    from edgecompress import export, verify

    clock = StageClock(progress or Progress())
    started = time.perf_counter()
    profile = profiles.load_profile(options.target)
    if profile["device"] != "cpu":
        raise EdgeCompressError(
            f"target '{profile['name']}' needs a {profile['device']} build, which this version does not "
            f"produce yet; use --target cpu-x86"
        )
    out = Path(options.out) if options.out else default_out(options.model, profile["name"])
    artifact.check_destination(out, options.force)
    source = models.resolve(options.model, options.revision, options.trust_remote_code)
    compression = options.compress
    saved_plan = _check_compress_options(compression) if compression else None
    formats = _weight_options(options, profile)

    with clock.stage("load") as note:
        note(f"{source.spec} ({source.kind})")
        loaded = models.load(source)

    plan = _plan_stage(clock, loaded, compression, saved_plan) if compression else None

    with artifact.staged_folder(out, options.force) as staging:
        with clock.stage("export"):
            export_info = export.export_onnx(loaded.model, staging)
            export.write_sidecar_files(staging, loaded)
        if plan is not None:
            with clock.stage("passes") as note:
                from edgecompress import transform
                from edgecompress.apply_plan import apply_plan

                note(f"{len(plan.replaced_layers)} layers replaced, {len(plan.removed_layers)} removed")
                export_info["passes"] = transform.apply_plan_to_artifact(staging, plan)
                plan.save(staging / "plan")
                apply_plan(loaded.model, plan, check_hash=False)  # the reference for verification
        with clock.stage("verify") as note:
            tolerances = verify.Tolerances.from_profile(profile)
            verification = verify.verify(staging, loaded.model, loaded.tokenizer, tolerances, note)
        with _fp32_reference(staging, formats) as reference:
            if reference is not None:
                export_info["optimize"] = _optimize_stage(clock, staging, formats, source)
                with clock.stage("verify-optimized") as note:
                    from edgecompress.verify_optimized import verify_against_reference

                    verification["optimized"] = verify_against_reference(
                        staging, reference, verify.prompt_ids(loaded.tokenizer), formats["weights"], profile, note
                    )
            evaluation = _evaluate_stage(clock, staging, options, reference, formats["weights"] != "fp32")
        with clock.stage("write"):
            report = {
                "edgecompress": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "source": source.describe(),
                "model": loaded.info,
                "target": {k: v for k, v in profile.items() if k != "verify"},
                "weights": formats,
                "export": export_info,
                "compression": _plan_summary(plan) if plan is not None else None,
                "evaluation": evaluation,
                "verification": verification,
                "files": sorted(p.name for p in staging.iterdir()),
                "manifest": artifact.manifest(staging),
            }
            report["size_bytes"] = sum(entry["bytes"] for entry in report["manifest"].values())
            report["timings_s"] = clock.timings
            report["total_seconds"] = round(time.perf_counter() - started, 2)
            report["peak_rss_mb"] = peak_rss_mb()
            report["machine"] = machine()
            (staging / artifact.REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    report["path"] = str(out)
    return report


def _check_compress_options(compression: CompressOptions):
    """Everything about compression that can be refused before the model is loaded."""
    from edgecompress.compress import METHODS
    from edgecompress.plan import CompressionPlan, check_ratio

    if compression.plan is not None:
        return CompressionPlan.load(compression.plan)
    if compression.method not in METHODS:
        raise EdgeCompressError(f"unknown method '{compression.method}'; use one of {', '.join(METHODS)}")
    if compression.ratio is None:
        raise EdgeCompressError("compression needs --ratio (fraction of all parameters to remove) or --plan")
    check_ratio(compression.ratio)
    if not 0.0 < compression.rho < 1.0:
        raise EdgeCompressError(f"--rho must be strictly between 0 and 1, got {compression.rho}")
    return None


def _plan_stage(clock: StageClock, loaded, compression: CompressOptions, saved_plan):
    """Calibrate and attribute (PyTorch only), or check that a saved plan belongs to this model."""
    from edgecompress.plan import model_weights_hash

    if saved_plan is not None:
        with clock.stage("plan") as note:
            note(f"reusing {compression.plan}")
            saved_plan.verify_hash(model_weights_hash(loaded.model))
        return saved_plan
    from edgecompress.calibrate import build_calibration, default_wikitext_dir
    from edgecompress.compress import make_plan

    source = compression.calibration or str(default_wikitext_dir() / "wiki.valid.tokens")
    with clock.stage("calibrate") as note:
        note(f"{compression.calib_sequences} x {compression.calib_seq_len} tokens from {source}")
        calib = build_calibration(
            source, loaded.tokenizer, compression.calib_sequences, compression.calib_seq_len, compression.seed
        )
    with clock.stage("attribute") as note:

        def progress(stage: str, done: int, total: int) -> None:
            note(f"{compression.method}: {stage} {done}/{total}")

        return make_plan(
            loaded.model, calib, compression.method, compression.ratio, compression.rho,
            compression.device, progress,
        )


def _plan_summary(plan) -> dict[str, Any]:
    data = plan.to_json_dict()
    data.pop("factors_file", None)
    return data


def _evaluate_stage(clock: StageClock, staging: Path, options: BuildOptions, reference: Path | None, low_bit: bool):
    """Perplexity of the verified artifact through onnxruntime, when asked (default: compressed or
    low-bit builds), and of the fp32 export beside it when the graph was optimized after export."""
    limit = options.eval_limit
    if limit is None:
        limit = 40 if options.compress or low_bit else 0
    if limit <= 0:
        return None
    from edgecompress.runtimes.perplexity import default_data, perplexity

    if default_data() is None:
        return {"skipped": "WikiText-2 test split not found (pass --eval-limit 0 or run `edgecompress eval`)"}

    def measure(folder: Path) -> dict[str, Any]:
        result = perplexity(folder, limit=limit)
        result.pop("artifact")  # a staging path, meaningless once renamed
        result.pop("window_nll")
        return result

    with clock.stage("evaluate") as note:
        note(f"WikiText-2 perplexity, {limit} windows of 512 tokens")
        result = measure(staging)
        if reference is not None:
            note("the same windows on the fp32 export")
            fp32 = measure(reference)
            result["fp32_export"] = {"perplexity": fp32["perplexity"], "seconds": fp32.get("seconds")}
            result["ratio_to_fp32"] = round(result["perplexity"] / fp32["perplexity"], 5)
    return result


def _weight_options(options: BuildOptions, profile: dict[str, Any]) -> dict[str, Any]:
    """Weight format, block size and fusion from the options or the target's defaults; refused early."""
    from edgecompress.passes.quantize_weights import check_format
    from edgecompress.weights import WEIGHT_FORMATS

    weights = options.weights or profile.get("weights", "fp32")
    supported = profile.get("weight_formats", ["fp32"])
    if weights not in WEIGHT_FORMATS + ("fp16",):
        raise EdgeCompressError(f"unknown weight format '{weights}'; use one of {', '.join(WEIGHT_FORMATS + ('fp16',))}")
    if weights not in supported:
        raise EdgeCompressError(
            f"target '{profile['name']}' cannot run {weights} weights; it supports {', '.join(supported)}"
        )
    if weights == "fp16":  # listed for GPU profiles; no bundled profile builds it yet
        raise EdgeCompressError("fp16 weights are not implemented in this version; use fp32, int8 or int4")
    block_size = int(options.block_size or profile.get("block_size", 32))
    accuracy_level = profile.get("accuracy_level", 4)
    if weights != "fp32":
        check_format(4 if weights == "int4" else 8, block_size, accuracy_level)
    fuse = options.fuse
    if fuse is None:  # the target's default: true, false, or "low-bit" (fused whenever weights are int8/int4)
        default = profile.get("fuse", "low-bit")
        fuse = weights != "fp32" if default == "low-bit" else default
    if not isinstance(fuse, bool):
        raise EdgeCompressError(f"target '{profile['name']}' has fuse = {fuse!r}; use true, false or \"low-bit\"")
    return {"weights": weights, "block_size": block_size, "accuracy_level": accuracy_level, "fuse": fuse}


@contextmanager
def _fp32_reference(staging: Path, formats: dict[str, Any]) -> Iterator[Path | None]:
    """A copy of the verified fp32 export beside the staging folder, for as long as the build needs it.

    A real copy, not hard links: onnx-ir refuses external data files with more than one link.
    """
    import shutil
    import tempfile

    if formats["weights"] == "fp32" and not formats["fuse"]:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix=".fp32-", dir=staging.parent))
    try:
        for entry in staging.iterdir():
            if entry.is_file():
                shutil.copy2(entry, folder / entry.name)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _optimize_stage(clock: StageClock, staging: Path, formats: dict[str, Any], source) -> dict[str, Any]:
    """Low-bit weights first (GGUF blocks kept exactly where they map), then onnxruntime fusions."""
    from edgecompress.weights import fuse_artifact, quantize_artifact

    counts: dict[str, Any] = {}
    with clock.stage("optimize") as note:
        if formats["weights"] != "fp32":
            gguf = Path(source.location) / source.gguf_file if source.gguf_file else None
            note(f"{formats['weights']} weights" + (" (GGUF blocks kept exactly)" if gguf else ""))
            counts["weights"] = quantize_artifact(
                staging, formats["weights"], formats["block_size"], source_gguf=gguf,
                accuracy_level=formats["accuracy_level"],
            )
        if formats["fuse"]:
            note("onnxruntime fusions")
            counts["fusion"] = fuse_artifact(staging)
    return counts
