"""`--compare BASELINE.json`: Δ % per matching test, as llama.cpp's compare-llama-bench.py shows it.

Rows match on the test key (name and batch). Δ % = (current − baseline) / baseline × 100, so for
latencies a negative Δ is faster and for throughputs a positive one is. Settings that differ (provider,
threads, IO binding, target) are listed as a warning: the rows still compare, the reader decides.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgecompress.runtimes.errors import ArtifactRuntimeError
from edgecompress.runtimes.profiler.assemble import SCHEMA

METRICS = (("ttft_ms", "mean"), ("itl_ms", "mean"), ("itl_ms", "p90"), ("tpot_ms", "mean"), ("e2e_ms", "mean"),
           ("prefill_tps", None), ("decode_tps", None))
SETTINGS = ("ep", "threads", "io_binding")


def load_baseline(path) -> dict:
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError:
        raise ArtifactRuntimeError(f"--compare file '{path}' cannot be read") from None
    except ValueError as exc:
        raise ArtifactRuntimeError(f"--compare file '{path}' is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ArtifactRuntimeError(f"--compare file '{path}' is not a profile.json (schema {SCHEMA})")
    return data


def _value(row: dict, metric: str, key: str | None):
    value = row.get(metric)
    if key is not None:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def delta_pct(current: float | None, baseline: float | None) -> float | None:
    if current is None or not baseline:
        return None
    return (current - baseline) / baseline * 100


def compare(current: dict, baseline: dict, path: str) -> dict:
    base_rows = {row["key"]: row for row in baseline.get("tests", [])}
    rows, unmatched = [], []
    for row in current["tests"]:
        base = base_rows.get(row["key"])
        if base is None:
            unmatched.append(row["key"])
            continue
        for metric, key in METRICS:
            now, then = _value(row, metric, key), _value(base, metric, key)
            if now is None or then is None:
                continue
            name = metric if key is None else f"{metric}.{key}"
            rows.append({"test": row["key"], "metric": name, "baseline": then, "current": now,
                         "delta_pct": delta_pct(now, then)})
    differing = {key: [baseline.get("settings", {}).get(key), current["settings"].get(key)] for key in SETTINGS
                 if baseline.get("settings", {}).get(key) != current["settings"].get(key)}
    return {"baseline": str(path), "baseline_artifact": baseline.get("artifact", {}).get("path"),
            "rows": rows, "unmatched": unmatched, "settings_differ": differing}
