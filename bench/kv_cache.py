"""Decode with the KV cache written in place and rotary inside GroupQueryAttention (issue 26, stage 2), against the
artifact built before them, in one interleaved run on this machine.

Three variants, each through the runtime's own step classes (runtimes/kv_steps.py), 2 threads:
- `before`: an artifact built by an earlier version (rotary applied by the export's ops, presents copied into a
  new buffer every step), run as its runtime ran it (NumpySteps);
- `after, copied`: this version's artifact (rotary inside the op) with a growing cache (NumpySteps);
- `after, in place`: the same artifact with one buffer per cache bound as past and present (SharedSteps).
For each depth (tokens already in the cache: 0, 512, 2048) an untimed prefill of `depth` random ids (1 id for
depth 0), then `--steps` greedy decode steps timed one by one; rounds rotate the order, round 0 is warm-up.
Also recorded: whether in place and copied give identical greedy tokens, and where `after` first departs from
`before` (random ids give near-ties), and both artifacts' perplexity on the same WikiText-2 test windows.
Writes bench/results/kv-cache.json.

    python bench/kv_cache.py BEFORE_ARTIFACT AFTER_ARTIFACT [--steps 64] [--repeats 5] [--windows 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgecompress.report import machine_description

RESULTS = Path(__file__).resolve().parent / "results" / "kv-cache.json"
DEPTHS = (0, 512, 2048)


def one_request(decoder, shared: bool, prompt: list[int], steps: int) -> tuple[list[float], list[int]]:
    from edgecompress.runtimes.kv_steps import NumpySteps, SharedSteps

    step = SharedSteps(decoder, len(prompt) + steps) if shared else NumpySteps(decoder)
    token = int(np.argmax(step(prompt)))
    times, tokens = [], [token]
    for _ in range(steps):
        started = time.perf_counter()
        logits = step([token])
        times.append((time.perf_counter() - started) * 1e3)
        token = int(np.argmax(logits))
        tokens.append(token)
    return times, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=40, help="WikiText-2 test windows (EDGECOMPRESS_DATA) for "
                                                                 "the perplexity of both artifacts; 0: skip")
    args = parser.parse_args()
    from edgecompress.runtimes.decoder import OrtDecoder

    load_before = os.getloadavg()
    decoders = {"before": OrtDecoder(args.before, threads=args.threads),
                "after": OrtDecoder(args.after, threads=args.threads)}
    assert decoders["after"].shares_kv_buffer and not decoders["before"].shares_kv_buffer
    variants = {"before": ("before", False), "after, copied": ("after", False), "after, in place": ("after", True)}
    rng = np.random.default_rng(0)
    rows = []
    for depth in DEPTHS:
        prompt = rng.integers(100, 40000, max(depth, 1)).tolist()
        samples = {label: [] for label in variants}
        tokens = {}
        order = list(variants)
        for repeat in range(args.repeats + 1):
            for label in order[repeat % len(order):] + order[:repeat % len(order)]:
                which, shared = variants[label]
                times, tokens[label] = one_request(decoders[which], shared, prompt, args.steps)
                if repeat:
                    samples[label].append(statistics.median(times))
        medians = {label: round(statistics.median(values), 3) for label, values in samples.items()}
        row = {"depth": depth, "ms_per_token": medians,
               "rounds_ms_per_token": {label: [round(v, 3) for v in values] for label, values in samples.items()},
               "speedup_vs_before": {label: round(medians["before"] / value, 3) for label, value in medians.items()},
               # in place vs copied: the same arithmetic, so identical; before vs after: rotary computed
               # elsewhere changes the last bits, which int8 activations can turn into a different token
               "greedy_identical_in_place_vs_copied": tokens["after, in place"] == tokens["after, copied"],
               "greedy_first_difference_after_vs_before": next(
                   (i for i, (a, b) in enumerate(zip(tokens["after, copied"], tokens["before"])) if a != b), None)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "rounds_ms_per_token"}), flush=True)
    perplexity = {}
    if args.windows:
        from edgecompress import api

        perplexity = {label: api.eval(folder, limit=args.windows)["perplexity"]
                      for label, folder in (("before", args.before), ("after", args.after))}
        print(json.dumps({"perplexity": perplexity, "windows": args.windows}), flush=True)
    result = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "artifacts": {"before": str(args.before), "after": str(args.after)},
        "settings": {"threads": args.threads, "steps": args.steps, "repeats": args.repeats,
                     "statistic": "median over rounds of each round's median step"},
        "rows": rows,
        "perplexity": perplexity,
        "perplexity_windows": args.windows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
