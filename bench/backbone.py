"""Backbone benchmark: build cost of smollm2-135m, and onnxruntime vs PyTorch eager CPU latency.

Writes bench/results/backbone.json with the machine's description. Latencies are medians over
repeated runs after warm-up; onnxruntime and PyTorch run in the same process, on the same inputs, with
the same thread count, so their ratio is the number to read (absolute times depend on the machine's
other load, which is recorded too).

Usage: python bench/backbone.py [--artifact DIR] [--threads 2] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgecompress.report import machine_description

RESULTS = Path(__file__).parent / "results" / "backbone.json"
MODEL = "smollm2-135m"
PREFILL, PAST = 512, 512


def measure_build(out: Path) -> dict:
    """Run the CLI as a child process: wall time, and peak RSS from the kernel's child accounting."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-P", "-m", "edgecompress.cli", "build", MODEL, "--target", "cpu-x86", "-o", str(out), "-q"],
        capture_output=True, text=True,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"build failed: {result.stderr.strip().splitlines()[-1]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    report = json.loads((out / "report.json").read_text())
    return {
        "command": f"edgecompress build {MODEL} --target cpu-x86",
        "wall_seconds": round(wall, 1),
        "peak_rss_mb": round(peak_kib / 1024, 1),
        "stage_seconds": report["timings_s"],
        "artifact_bytes": report["size_bytes"],
        "verification_passed": report["verification"]["passed"],
        "greedy_identical": report["verification"]["greedy"]["identical"],
    }


def timed(fn, repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return {"median_ms": round(1000 * statistics.median(samples), 2), "min_ms": round(1000 * min(samples), 2),
            "runs": repeats}


def measure_latency(artifact: Path, threads: int, repeats: int) -> dict:
    import torch

    from edgecompress import models
    from edgecompress.runtimes.decoder import OrtDecoder
    from edgecompress.verify import TorchReference

    torch.set_num_threads(threads)
    decoder = OrtDecoder(artifact, threads=threads)
    loaded = models.load(models.resolve(MODEL))
    reference = TorchReference(loaded.model)
    layout = decoder.layout

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, loaded.config.vocab_size, (1, PREFILL))
    prefill_args = (prompt, np.ones((1, PREFILL), np.int64), np.arange(PREFILL)[None, :], decoder.empty_cache(1))
    _, past = decoder.forward(*prefill_args)
    past = [p[:, :, :PAST] for p in past]
    step_args = (np.asarray([[7]]), np.ones((1, PAST + 1), np.int64), np.asarray([[PAST]]), past)
    results = {}
    for name, args, runs in (("prefill_512", prefill_args, max(3, repeats // 3)), ("decode_1_after_512", step_args, repeats)):
        ort_stats = timed(lambda: decoder.forward(*args), runs)
        torch_stats = timed(lambda: reference.forward(*args), runs)
        results[name] = {
            "onnxruntime": ort_stats,
            "pytorch_eager": torch_stats,
            "ort_speedup_vs_torch": round(torch_stats["median_ms"] / ort_stats["median_ms"], 3),
        }
    results["threads"] = threads
    results["kv_layout"] = {"layers": layout.num_layers, "kv_heads": layout.kv_heads, "head_dim": layout.head_dim}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="reuse a built artifact for the latency part")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    record = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_description()}
    with tempfile.TemporaryDirectory(prefix="ec-bench-") as tmp:
        artifact = args.artifact
        if artifact is None:
            artifact = Path(tmp) / "smollm2"
            record["build"] = measure_build(artifact)
            print("build:", json.dumps(record["build"]), flush=True)
        record["latency_cpu"] = measure_latency(artifact, args.threads, args.repeats)
    record["targets"] = {
        "build_wall_seconds_max": 300,
        "build_peak_rss_mb_max": 4096,
        "decode_ort_speedup_vs_torch_min": 1.0,
    }
    record["machine"]["load_average_at_end"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["latency_cpu"], indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
