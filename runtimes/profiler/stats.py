"""Summaries of latency samples, as vLLM and optimum-benchmark report them.

Percentiles by numpy's linear interpolation; `std` is the sample standard deviation (n − 1, as
llama-bench's ±), 0 for a single sample. `n` is always given, and a p99 that rests on fewer than 100
samples is flagged: it is then the maximum, or close to it, rather than a tail estimate.
"""

from __future__ import annotations

import numpy as np

KEYS = ("mean", "std", "min", "p50", "p90", "p99", "max", "n")
P99_MIN_SAMPLES = 100


def summarize(samples) -> dict | None:
    """mean, std, min, p50, p90, p99, max, n of `samples` (ms); `samples` kept as given (nested lists too)."""
    values = np.asarray(_flatten(samples), dtype=np.float64)
    if values.size == 0:
        return None
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    summary = {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "min": float(values.min()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(values.max()),
        "n": int(values.size),
    }
    summary["samples"] = samples
    return summary


def _flatten(samples) -> list[float]:
    flat: list[float] = []
    for item in samples:
        if isinstance(item, (list, tuple)):
            flat += _flatten(item)
        else:
            flat.append(item)
    return flat


def p99_warning(test_name: str, summaries: dict[str, dict | None]) -> str | None:
    """One line per test naming every metric whose p99 rests on fewer than 100 samples."""
    thin = [f"{metric} ({summary['n']})" for metric, summary in summaries.items()
            if summary is not None and summary["n"] < P99_MIN_SAMPLES]
    if not thin:
        return None
    return f"{test_name}: p99 from fewer than {P99_MIN_SAMPLES} samples (read it as the max): {', '.join(thin)}"


def mean_std(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0}
