"""profile.md / profile.csv / profile.json text, and writing the output folder all at once.

The folder is assembled in a hidden sibling and moved into place only when every file is written,
so a failed run leaves nothing half-written. Estimates are always called estimated.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

from edgecompress.runtimes.errors import ArtifactRuntimeError

LATENCY = ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms")
TRACE_PREFIX = "edgecompress-trace-"  # ops.op_profile's temporary folder


def check_out_dir(out) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ArtifactRuntimeError(f"-o {out}: exists and is not a folder")
    parent = path.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ArtifactRuntimeError(f"-o {out}: cannot write in '{parent}'")
    return path


def _num(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(_num(cell) if not isinstance(cell, str) else cell for cell in row) + " |"
                    for row in rows]


def markdown(result: dict) -> str:
    art, settings, device = result["artifact"], result["settings"], result["device"]
    lines = [f"# edgecompress profile: {art['name']}", "",
             f"{device['host']['cpu']}, {settings['ep']}, threads {settings['threads'] or 'default'}, "
             f"IO binding {'on' if settings['io_binding'] else 'off'}"
             f"{', KV cache shared in place' if settings.get('shared_kv_buffer') else ''}, onnxruntime "
             f"{device['software'].get('onnxruntime_distribution') or device['software']['onnxruntime']}; "
             f"load {_num(result['load_ms'], 1)} ms, first run {_num(result['first_run_ms'], 1)} ms; "
             f"{settings['repetitions']} repetitions after {settings['warmup']} warm-up, {settings['prompt']}", ""]
    size = f"{art['weights_bytes'] / 2**20:.1f} MiB"
    params = f"{art['params'] / 1e6:.2f} M" if art.get("params") else "?"
    lines += _table(["model", "size", "params", "ep", "threads", "test", "t/s"],
                    [[art["name"], size, params, settings["ep"].replace("ExecutionProvider", ""),
                      str(settings["threads"] or "default"), row["key"],
                      f"{row['tps']['mean']:.2f} ± {row['tps']['std']:.2f}"] for row in result["tests"]])
    lines += ["", "## Latency (ms)", ""]
    rows = [[row["key"], metric] + [row[metric][k] for k in ("mean", "std", "p50", "p90", "p99", "max", "n")]
            for row in result["tests"] for metric in LATENCY if row.get(metric)]
    lines += _table(["test", "metric", "mean", "std", "p50", "p90", "p99", "max", "n"], rows)
    lines += ["", *_table(["test", "prefill_tps", "decode_tps", "e2e_tps", "sampling_ms"],
                          [[r["key"], r["prefill_tps"], r["decode_tps"], r["e2e_tps"], r["sampling_ms"]]
                           for r in result["tests"]])]
    lines += _memory_md(result) + _ops_md(result) + _roofline_md(result) + _compare_md(result)
    notes = [f"- warning: {w}" for w in result["warnings"]] + [f"- note: {n}" for n in result["notes"]]
    return "\n".join(lines + ([""] + notes if notes else []) + [""])


def _memory_md(result: dict) -> list[str]:
    rows = [[r["key"], m.get("host_rss_prefill_peak_mb"), m.get("host_rss_decode_peak_mb"),
             m.get("gpu_process_peak_mb"), m.get("system_ram_used_peak_mb"), ", ".join(m["source"])]
            for r in result["tests"] if (m := r.get("memory"))]
    if not rows:
        return []
    load = result.get("memory") or {}
    head = f"load peak {_num(load.get('host_rss_load_peak_mb'), 0)} MB host RSS ({load.get('note', '')})"
    return ["", "## Memory (MB)", "", head, "",
            *_table(["test", "host prefill peak", "host decode peak", "GPU process peak", "system RAM peak",
                     "source"], rows)]


def _ops_md(result: dict) -> list[str]:
    ops = result.get("ops")
    if not ops:
        return []
    pre, dec = ops["prefill"], ops["decode"]
    roles = dict.fromkeys([r["role"] for r in pre["by_role"]] + [r["role"] for r in dec["by_role"]])
    by = {phase: {r["role"]: r for r in ops[phase]["by_role"]} for phase in ("prefill", "decode")}
    rows = [[role, *(by[p].get(role, {}).get(k) for p in ("prefill", "decode") for k in ("ms", "pct")),
             by["decode"].get(role, {}).get("gbs")] for role in roles]
    lines = ["", f"## Time by role ({ops['pass']}; {ops['note']}; timing: {ops['timing']})", "",
             *_table(["role", "prefill ms", "prefill %", "decode ms/step", "decode %", "decode GB/s"], rows),
             "", f"run overhead outside kernels: prefill {_num(pre['overhead_ms'], 3)} ms, "
                 f"decode {_num(dec['overhead_ms'], 3)} ms per run", "", "Top decode nodes:", ""]
    lines += _table(["node", "op", "role", "ms", "GB/s", "% of target BW"],
                    [[n["name"], n["op"], n["role"], n["ms"], n["gbs"], n["roofline_pct"]] for n in dec["top_nodes"]])
    return lines


def _roofline_md(result: dict) -> list[str]:
    roof = result["roofline"]
    head = (f"## Roofline (estimated): target {roof['target']}, {_num(roof['bw_gbs'], 1)} GB/s "
            f"({roof['bw_source']}), {_num(roof['peak_tflops'], 2)} TFLOPS ({roof['dtype']}), efficiencies "
            f"{roof['bw_efficiency']} (bandwidth) / {roof['compute_efficiency']} (compute)")
    rows = [[phase, roof[phase]["test"], roof[phase]["bytes_per_token"] / 2**20, roof[phase]["flops_per_token"] / 1e9,
             roof[phase]["est_ms"], roof[phase]["measured_ms"], roof[phase]["bound_est"] or "–",
             roof[phase]["pct_of_roofline"]] for phase in ("prefill", "decode") if phase in roof]
    return ["", head, "", roof["label"], "", *_table(["phase", "test", "MiB/token", "GFLOP/token", "estimated ms", "measured ms",
                                   "bound (estimated)", "estimated/measured %"], rows)]


def _compare_md(result: dict) -> list[str]:
    comp = result.get("compare")
    if not comp:
        return []
    lines = ["", f"## Compared with {comp['baseline']} (Δ % = (current − baseline) / baseline)", ""]
    lines += _table(["test", "metric", "baseline", "current", "Δ %"],
                    [[r["test"], r["metric"], r["baseline"], r["current"], r["delta_pct"]] for r in comp["rows"]])
    if comp["unmatched"]:
        lines += ["", "not in the baseline: " + ", ".join(comp["unmatched"])]
    return lines


CSV_FIELDS = ("artifact", "test", "batch", "n_prompt", "n_gen", "n_depth", "ttft_ms_mean", "ttft_ms_p50", "ttft_ms_p99",
              "itl_ms_mean", "itl_ms_p50", "itl_ms_p90", "itl_ms_p99", "tpot_ms_mean", "e2e_ms_mean", "prefill_tps",
              "decode_tps", "e2e_tps", "decode_est_ms", "prefill_est_ms")


def csv_text(result: dict) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in result["tests"]:
        record = {"artifact": result["artifact"]["name"], "test": row["key"]}
        record.update({k: row[k] for k in ("batch", "n_prompt", "n_gen", "n_depth", "prefill_tps", "decode_tps", "e2e_tps")})
        for field in CSV_FIELDS:
            metric, _, stat = field.rpartition("_")
            if metric in LATENCY and row.get(metric):
                record[field] = row[metric][stat]
        for phase in ("decode", "prefill"):
            record[f"{phase}_est_ms"] = row["roofline"].get(phase, {}).get("est_ms")
        writer.writerow(record)
    return buffer.getvalue()


def public(result: dict) -> dict:
    return {key: value for key, value in result.items() if not key.startswith("_")}


def render(result: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(public(result), indent=1)
    if fmt == "csv":
        return csv_text(result)
    return markdown(result)


def write_outputs(result: dict, out: Path, plot=None) -> Path:
    """profile.json, .md, .csv, .png (when matplotlib is there), ort_trace.json, tegrastats.log."""
    out = Path(out)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        files = result.pop("_files", {}) or {}
        if result.get("ops") and result["ops"].get("trace"):
            trace = Path(result["ops"]["trace"])
            shutil.copyfile(trace, staging / "ort_trace.json")
            result["ops"]["trace"] = "ort_trace.json"
            if trace.parent.name.startswith(TRACE_PREFIX):  # the pass's own temporary folder
                shutil.rmtree(trace.parent, ignore_errors=True)
        for name, lines in files.items():
            (staging / name).write_text("\n".join(lines) + "\n")
        if plot is not None:
            note = plot(result, staging / "profile.png")
            if note:
                result["notes"].append(note)
        (staging / "profile.md").write_text(markdown(result))
        (staging / "profile.csv").write_text(csv_text(result))
        (staging / "profile.json").write_text(json.dumps(public(result), indent=1))
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _move_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    for file in staging.iterdir():
        os.replace(file, out / file.name)


def discard_files(result: dict) -> None:
    """No output folder keeps them: drop the side files and the op pass's temporary trace folder."""
    result.pop("_files", None)
    trace = (result.get("ops") or {}).get("trace")
    if trace and Path(trace).parent.name.startswith(TRACE_PREFIX):
        shutil.rmtree(Path(trace).parent, ignore_errors=True)
        result["ops"]["trace"] = None  # removed: profile with -o DIR to keep ort_trace.json
