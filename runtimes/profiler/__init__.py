"""`edgecompress profile`: on-device latency, memory, per-op time and a roofline for an artifact.

Imports only onnxruntime, numpy and tokenizers (NVML through `pynvml` and matplotlib for the
picture are optional, imported when used): copy the runtime beside an artifact onto a device and
profile it there. Entry points: `profile_artifact` (one artifact, writes the output folder) and
`profile_artifacts` (several, repetitions interleaved across them, as the benchmarks use it).
"""

from __future__ import annotations

from pathlib import Path

from edgecompress.runtimes.profiler.assemble import SCHEMA
from edgecompress.runtimes.profiler.compare import compare, load_baseline
from edgecompress.runtimes.profiler.outputs import check_out_dir, discard_files, render, write_outputs
from edgecompress.runtimes.profiler.plot import plot_profile
from edgecompress.runtimes.profiler.run import profile_artifacts
from edgecompress.runtimes.profiler.settings import ProfileSettings

__all__ = ["SCHEMA", "ProfileSettings", "profile_artifact", "profile_artifacts", "render"]


def profile_artifact(artifact, settings: ProfileSettings | None = None, *, out=None, compare_to=None,
                     progress=None) -> dict:
    """Profile one artifact; with `out`, write profile.{json,md,csv,png} and ort_trace.json there.
    `compare_to`: a baseline profile.json, for Δ % per matching test. Every bad input is refused
    (one-line `ArtifactRuntimeError`) before anything runs or is written."""
    out_dir = check_out_dir(out) if out is not None else None
    baseline = load_baseline(compare_to) if compare_to is not None else None
    [result] = profile_artifacts([artifact], settings, progress)
    if baseline is not None:
        result["compare"] = compare(result, baseline, str(compare_to))
        if result["compare"]["settings_differ"]:
            result["warnings"].append(f"the baseline ran with other settings: {result['compare']['settings_differ']}")
    if out_dir is not None:
        write_outputs(result, Path(out_dir), plot_profile)
    else:  # nothing kept: the op pass's temporary trace folder goes too
        discard_files(result)
    return result
