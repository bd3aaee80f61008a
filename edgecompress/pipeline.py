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
class BuildOptions:
    model: str | None = None
    target: str | None = None
    out: Path | None = None
    force: bool = False
    revision: str | None = None
    trust_remote_code: bool = False


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

    with clock.stage("load") as note:
        note(f"{source.spec} ({source.kind})")
        loaded = models.load(source)

    with artifact.staged_folder(out, options.force) as staging:
        with clock.stage("export"):
            export_info = export.export_onnx(loaded.model, staging)
            files = export.write_sidecar_files(staging, loaded)
        with clock.stage("verify") as note:
            tolerances = verify.Tolerances.from_profile(profile)
            verification = verify.verify(staging, loaded.model, loaded.tokenizer, tolerances, note)
        with clock.stage("write"):
            report = {
                "edgecompress": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "source": source.describe(),
                "model": loaded.info,
                "target": {k: v for k, v in profile.items() if k != "verify"},
                "export": export_info,
                "verification": verification,
                "files": files,
                "manifest": artifact.manifest(staging),
                "size_bytes": sum(p.stat().st_size for p in staging.iterdir() if p.is_file()),
            }
            report["timings_s"] = clock.timings
            report["total_seconds"] = round(time.perf_counter() - started, 2)
            report["peak_rss_mb"] = peak_rss_mb()
            report["machine"] = machine()
            (staging / artifact.REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    report["path"] = str(out)
    return report
