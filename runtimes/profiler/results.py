"""One test's row of profile.json from its repetitions: vLLM/MLPerf metric names, llama-bench's t/s.

ttft_ms: prefill call + argmax (the first token on the host). itl_ms: every decode step, kept per
repetition ([rep][step]). tpot_ms per repetition: (e2e − TTFT) / (n_gen − 1) for a request with a
prefill, e2e / n_gen for decode-only tests. Throughputs, never a bare "tokens/s": prefill_tps =
batch·n_prompt / mean TTFT, decode_tps = batch / mean ITL, e2e_tps = batch·n_gen / mean e2e.
`tps` is llama-bench's t/s (mean ± sd over repetitions of tokens processed / time).
"""

from __future__ import annotations

from edgecompress.runtimes.profiler import stats
from edgecompress.runtimes.profiler.loop import Request
from edgecompress.runtimes.profiler.settings import Shape

MS = 1e-6  # ns -> ms


def test_row(shape: Shape, requests: list[Request]) -> tuple[dict, list[str]]:
    """The metrics of one test and the warnings they carry."""
    ttft = [r.ttft_ns * MS for r in requests if r.ttft_ns is not None]
    itl = [[ns * MS for ns in r.itl_ns] for r in requests if r.itl_ns]
    e2e = [r.e2e_ns * MS for r in requests]
    tpot = [_tpot(shape, r) for r in requests]
    tpot = [value for value in tpot if value is not None]
    sampling = [ns * MS for r in requests for ns in r.sampling_ns]
    summaries = {"ttft_ms": stats.summarize(ttft), "itl_ms": stats.summarize(itl), "tpot_ms": stats.summarize(tpot),
                 "e2e_ms": stats.summarize(e2e)}
    batch = shape.batch
    row = {
        "name": shape.name,
        "key": shape.key,
        "n_prompt": shape.n_prompt,
        "n_gen": shape.n_gen,
        "n_depth": shape.n_depth,
        "batch": batch,
        "decode_steps": shape.decode_steps,
        **summaries,
        "prefill_tps": batch * shape.n_prompt / (summaries["ttft_ms"]["mean"] * 1e-3) if ttft else None,
        "decode_tps": batch / (summaries["itl_ms"]["mean"] * 1e-3) if itl else None,
        "e2e_tps": batch * shape.n_gen / (summaries["e2e_ms"]["mean"] * 1e-3) if shape.n_gen else None,
        "tps": stats.mean_std([_llama_bench_tps(shape, r) for r in requests]),
        "sampling_ms": sum(sampling) / len(sampling) if sampling else None,
    }
    warning = stats.p99_warning(shape.key, summaries)
    return row, [warning] if warning else []


def _tpot(shape: Shape, request: Request) -> float | None:
    if shape.n_prompt and shape.n_gen > 1:
        return (request.e2e_ns - request.ttft_ns) * MS / (shape.n_gen - 1)
    if not shape.n_prompt and shape.n_gen:
        return request.e2e_ns * MS / shape.n_gen
    return None


def _llama_bench_tps(shape: Shape, request: Request) -> float:
    tokens = shape.n_prompt + shape.decode_steps
    seconds = request.e2e_ns * 1e-9
    return shape.batch * tokens / seconds


def memory_row(requests: list[Request], samplers: dict, host_source: str | None) -> dict | None:
    """Peaks over the test's repetitions, each with its source."""
    if host_source is None and not samplers:
        return None
    row: dict = {"source": []}
    if host_source is not None:
        prefill = [r.host_prefill_peak_mb for r in requests if r.host_prefill_peak_mb is not None]
        decode = [r.host_decode_peak_mb for r in requests if r.host_decode_peak_mb is not None]
        row["host_rss_prefill_peak_mb"] = max(prefill) if prefill else None
        row["host_rss_decode_peak_mb"] = max(decode) if decode else None
        row["host_rss_peak_mb"] = max(prefill + decode) if prefill + decode else None
        row["source"].append(host_source)
    windows = [r.window for r in requests]
    if "nvml" in samplers:
        seen = samplers["nvml"].window_stats(windows)
        row["gpu_process_peak_mb"] = _max(seen, "gpu_process_mb")
        row["gpu_device_used_peak_mb"] = _max(seen, "gpu_device_used_mb")
        row["gpu_device_delta_peak_mb"] = _max(seen, "gpu_device_delta_mb")
        row["source"].append(samplers["nvml"].source())
    if "tegrastats" in samplers:
        seen = samplers["tegrastats"].window_stats(windows)
        row["system_ram_used_peak_mb"] = _max(seen, "ram_used_mb")
        row["power_w"] = {key[len("power_"):-len("_mw")]: {"avg": v["mean"] / 1e3, "max": v["max"] / 1e3}
                          for key, v in seen.items() if key.startswith("power_")}
        row["source"].append("tegrastats")
    return row


def _max(seen: dict, key: str) -> float | None:
    return seen[key]["max"] if key in seen else None
