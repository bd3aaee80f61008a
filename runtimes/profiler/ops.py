"""Per-op and per-role time from onnxruntime's own profiler, in a separate short pass.

Profiling records shapes and counters per node, which slows every run: so, as trtexec's
`--separateProfileRun`, it runs in its own session (one warm-up request, then one prefill and
`steps` decode steps) and none of it feeds the timed numbers. Runs are told apart by the trace's
`model_run` windows; each node event is mapped to its graph node (roles.NodeIndex), so fused nodes
and low-rank factors land in the right role. Bytes per node = activation + output bytes from the
trace, plus the node's weight bytes from the graph (onnxruntime pre-packs MatMul weights and then
reports parameter_size 0 for them); achieved GB/s = bytes / kernel time.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from edgecompress.runtimes.profiler.loop import Runner
from edgecompress.runtimes.profiler.onnx_graph import Graph
from edgecompress.runtimes.profiler.roles import NodeIndex, node_layer, node_role, role_of_op
from edgecompress.runtimes.errors import ArtifactRuntimeError
from edgecompress.runtimes.session import create_session

TOP_NODES = 10


def profiling_pass(folder: Path, providers, threads, io_binding: bool, prefill_ids: np.ndarray, steps: int,
                   trace_dir: Path, session_kwargs: dict | None = None) -> tuple[Path, int]:
    """Run warm-up + the profiled request in a profiling session configured as the timed one
    (`session_kwargs`: provider options, session config); returns the trace and the number of warm-up
    runs at its start (dropped, B.4: the first runs plan memory and grow the arena)."""
    session = create_session(folder, providers=providers, threads=threads,
                             profile_prefix=str(trace_dir / "ort_profile"), **(session_kwargs or {}))
    runner = Runner(session, io_binding)
    capacity = prefill_ids.shape[1] + steps + 1  # a shared cache's buffer (Runner.reset)
    runner.reset(prefill_ids.shape[0], capacity)  # a warm-up request: one prefill and one decode step
    runner.step(runner.step(prefill_ids).tokens[:, None])
    warmup_runs = 2
    runner.reset(prefill_ids.shape[0], capacity)
    tokens = runner.step(prefill_ids).tokens[:, None]
    for _ in range(steps):
        tokens = runner.step(tokens).tokens[:, None]
    return Path(session.end_profiling()), warmup_runs


def load_trace(path: Path) -> list[dict]:
    events = json.loads(Path(path).read_text())
    return events["traceEvents"] if isinstance(events, dict) else events


def split_runs(events: list[dict]) -> list[list[dict]]:
    """Node events grouped by the `model_run` window they fall in, in run order."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e.get("ph") == "X"), key=lambda e: e["ts"])
    grouped: list[list[dict]] = [[] for _ in runs]
    index = 0
    for node in nodes:
        while index < len(runs) and node["ts"] >= runs[index]["ts"] + runs[index]["dur"]:
            index += 1
        if index < len(runs) and node["ts"] >= runs[index]["ts"]:
            grouped[index].append(node)
    return [[run] + nodes_of_run for run, nodes_of_run in zip(runs, grouped)]


def classify(event: dict, index: NodeIndex) -> dict:
    """An event's node, op, provider, role, layer and bytes."""
    args = event.get("args", {})
    node = index.find(event["name"])
    op = args.get("op_name") or (node.op_type if node else "?")
    name = event["name"].removesuffix("_kernel_time")
    trace_bytes = sum(int(args.get(key, 0) or 0) for key in ("activation_size", "output_size"))
    params = int(args.get("parameter_size", 0) or 0)
    if node is None:
        role, layer = role_of_op(op, name), None
    else:
        role, layer = node_role(node, index.graph), node_layer(node)
        if node.op_type == "Gather":  # a lookup reads the rows it outputs, not the whole table
            params = int(args.get("output_size", 0) or 0)
        else:
            params = max(params, sum(w.nbytes for w in index.graph.weights_of(node)))
    return {"name": name, "op": op, "provider": args.get("provider", ""), "role": role, "layer": layer,
            "us": float(event["dur"]), "bytes": trace_bytes + params}


def summarize_phase(runs: list[list[dict]], index: NodeIndex, bw_gbs: float | None) -> dict:
    """Mean per run over `runs` (each [model_run event, node events...])."""
    count = len(runs)
    if count == 0:
        raise ArtifactRuntimeError("the onnxruntime trace holds no model_run event for this phase (event cap reached?)")
    rows = [classify(e, index) for run in runs for e in run[1:] if e["name"].endswith("_kernel_time")]
    run_ms = sum(run[0]["dur"] for run in runs) / count / 1e3
    kernels_ms = sum(r["us"] for r in rows) / count / 1e3
    return {
        "runs": count,
        "run_ms": run_ms,
        "kernels_ms": kernels_ms,
        "overhead_ms": run_ms - kernels_ms,
        "by_role": _group(rows, lambda r: r["role"], count, kernels_ms, "role"),
        "by_op": _by_op(rows, count, kernels_ms),
        "by_layer": [{"layer": layer, "ms": ms} for layer, ms in
                     sorted((kv for kv in _sums(rows, lambda r: r["layer"], count).items() if kv[0] is not None))],
        "top_nodes": _top_nodes(rows, count, bw_gbs),
    }


def _sums(rows, key, count) -> dict:
    totals: dict = defaultdict(float)
    for row in rows:
        totals[key(row)] += row["us"] / count / 1e3
    return totals


def _group(rows, key, count, total_ms, label) -> list[dict]:
    ms, moved = defaultdict(float), defaultdict(float)
    for row in rows:
        ms[key(row)] += row["us"] / count / 1e3
        moved[key(row)] += row["bytes"] / count
    out = [{label: name, "ms": ms[name], "pct": 100 * ms[name] / total_ms if total_ms else 0.0,
            "bytes": int(moved[name]), "gbs": moved[name] / (ms[name] * 1e6) if ms[name] else None}
           for name in ms]
    return sorted(out, key=lambda r: -r["ms"])


def _by_op(rows, count, total_ms) -> list[dict]:
    groups: dict = defaultdict(lambda: {"calls": 0, "us": 0.0})
    for row in rows:
        group = groups[(row["op"], row["provider"])]
        group["calls"] += 1
        group["us"] += row["us"]
    out = [{"op": op, "provider": provider, "calls": g["calls"] / count, "ms": g["us"] / count / 1e3,
            "pct": 100 * g["us"] / count / 1e3 / total_ms if total_ms else 0.0}
           for (op, provider), g in groups.items()]
    return sorted(out, key=lambda r: -r["ms"])


def _top_nodes(rows, count, bw_gbs) -> list[dict]:
    per_node: dict = {}
    for row in rows:
        entry = per_node.setdefault(row["name"], {**row, "us": 0.0})
        entry["us"] += row["us"] / count
    top = sorted(per_node.values(), key=lambda r: -r["us"])[:TOP_NODES]
    out = []
    for row in top:
        gbs = row["bytes"] / (row["us"] * 1e3) if row["us"] else None
        out.append({"name": row["name"], "op": row["op"], "role": row["role"], "layer": row["layer"],
                    "ms": row["us"] / 1e3, "bytes": row["bytes"], "gbs": gbs,
                    "roofline_pct": 100 * gbs / bw_gbs if gbs and bw_gbs else None})
    return out


def op_profile(folder: Path, graph: Graph, providers, threads, io_binding: bool, prefill_ids: np.ndarray,
               steps: int, bw_gbs: float | None, trace_dir: Path | None = None,
               session_kwargs: dict | None = None) -> tuple[dict, Path]:
    """The `ops` section of the profile and the raw trace file."""
    trace_dir = Path(trace_dir or tempfile.mkdtemp(prefix="edgecompress-trace-"))  # outputs.TRACE_PREFIX
    trace, skip = profiling_pass(folder, providers, threads, io_binding, prefill_ids, steps, trace_dir, session_kwargs)
    events = load_trace(trace)
    runs = split_runs(events)[skip:]
    index = NodeIndex(graph)
    gpu = any("CUDA" in p or "Tensorrt" in p for p in _names(providers))
    cupti = any(e.get("cat") == "Kernel" for e in events)
    timing = "cupti" if cupti else ("host (CUDA kernels run asynchronously: launch time, not GPU time)" if gpu
                                    else "host")
    section = {
        "pass": f"prefill {prefill_ids.shape[1]} + {steps} decode steps (batch {prefill_ids.shape[0]})",
        "note": "from a separate profiling session; never used for the timed numbers",
        "timing": timing,
        "events": len(events),
        "prefill": summarize_phase(runs[:1], index, bw_gbs),
        "decode": summarize_phase(runs[1:], index, bw_gbs),
    }
    return section, trace


def _names(providers) -> list[str]:
    return [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
