"""Prefill and time to first token with and without `logits_to_keep` (issue 26, stage 1), in one session.

The artifact is built by this version (`edgecompress build smollm2-135m --weights int4`, the fused int4
artifact the speed issue measures, unless --artifact is given), so it has the optional input; the
same session runs a 512-token prefill with logits_to_keep 0 (every position: what every earlier artifact
computed) and 1 (what `generate` and `profile` now ask for), interleaved, 2 threads. TTFT is the prefill
plus the greedy choice of the first token. Writes bench/results/logits-to-keep.json.

    python bench/logits_to_keep.py [--artifact OUT] [--repeats 15] [--tokens 512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgecompress import contract
from edgecompress.report import machine_description

RESULTS = Path(__file__).resolve().parent / "results" / "logits-to-keep.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ec-logits-") as tmp:
        artifact = args.artifact
        if artifact is None:
            artifact = Path(tmp) / "int4"
            command = [sys.executable, "-P", "-m", "edgecompress.cli", "build", "smollm2-135m", "--weights", "int4",
                       "-o", str(artifact), "-q"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"build failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        row = measure(artifact, args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row, indent=2))


def measure(artifact: Path, args) -> dict:
    from edgecompress.runtimes.decoder import OrtDecoder

    decoder = OrtDecoder(artifact, threads=args.threads)
    if not decoder.last_only:
        raise SystemExit(f"{artifact} has no {contract.LOGITS_TO_KEEP} input: build it with this version")
    rng = np.random.default_rng(0)
    ids = rng.integers(100, 40000, (1, args.tokens)).astype(np.int64)
    mask, positions = np.ones_like(ids), np.arange(args.tokens, dtype=np.int64)[None, :]
    times: dict[str, dict[str, list[float]]] = {"all": {"prefill": [], "ttft": []}, "last": {"prefill": [], "ttft": []}}
    tokens = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not kept
        for label in ("all", "last") if repeat % 2 == 0 else ("last", "all"):
            start = time.perf_counter()
            logits, _ = decoder.forward(ids, mask, positions, decoder.empty_cache(1), last_only=label == "last")
            ran = time.perf_counter()
            tokens[label] = int(np.argmax(logits[0, -1]))
            done = time.perf_counter()
            if repeat:
                times[label]["prefill"].append((ran - start) * 1e3)
                times[label]["ttft"].append((done - start) * 1e3)
    median = {label: {kind: round(statistics.median(values), 2) for kind, values in kinds.items()}
              for label, kinds in times.items()}
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "load_average": os.getloadavg(),
        "artifact": str(artifact) if args.artifact else "edgecompress build smollm2-135m --weights int4 (temporary)",
        "tokens": args.tokens, "repeats": args.repeats, "threads": args.threads,
        "median_ms": median,
        "ratio_last_over_all": {kind: round(median["last"][kind] / median["all"][kind], 3) for kind in ("prefill", "ttft")},
        "same_first_token": tokens["all"] == tokens["last"],
        "samples_ms": times,
    }


if __name__ == "__main__":
    main()
