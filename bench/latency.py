"""CPU latency of 20 % GRASP compression, measured with `edgecompress profile`'s own API.

Four smollm2-135m artifacts (dense and 20 % GRASP, each fp32 and int4) are profiled in one run, the
repetitions interleaved across all four (rep → test → artifact), on the CPU provider: `pp512` (TTFT of
a 512-token prompt) and `tg128 @ d512` (128 decode steps after 512 cached tokens). For each pair
(fp32, int4) the measured speedup compressed vs dense (decode ITL ratio, prefill TTFT ratio) is set
against the ideal one from the profiler's roofline accounting (decode: bytes read per token, dense ÷
compressed; prefill: FLOPs, dense ÷ compressed); the goal is measured ÷ ideal ≥ 90 %. The same
artifacts' roofline estimates for `jetson-orin-nano` are added, labelled as a prediction.

Writes bench/results/latency-cpu.json (with the machine description) and latency-cpu.md.

Usage: python bench/latency.py [--art /tmp/art] [--threads 2] [--reps 5] [--n-gen 128] [--depth 512]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from edgecompress.report import machine_description
from edgecompress.runtimes.profiler import ProfileSettings, profile_artifacts
from edgecompress.runtimes.profiler.predict import predict
from edgecompress.runtimes.profiler.settings import Shape

RESULTS = Path(__file__).parent / "results"
ARTIFACTS = ("dense-fp32", "dense-int4", "r20-fp32", "r20-int4")
PAIRS = {"fp32": ("dense-fp32", "r20-fp32"), "int4": ("dense-int4", "r20-int4")}
PREDICTION_TARGET = "jetson-orin-nano"


def _strip_samples(value):
    """The JSON keeps summaries, not every sample (profile.json from the CLI has those)."""
    if isinstance(value, dict):
        return {k: _strip_samples(v) for k, v in value.items() if k != "samples"}
    if isinstance(value, list):
        return [_strip_samples(v) for v in value]
    return value


def summarize(result: dict, prompt_key: str, decode_key: str) -> dict:
    tests = {row["key"]: row for row in result["tests"]}
    pp, tg = tests[prompt_key], tests[decode_key]
    roof_tg, roof_pp = tg["roofline"]["decode"], pp["roofline"]["prefill"]
    return {
        "artifact": result["artifact"],
        "load_ms": result["load_ms"],
        "first_run_ms": result["first_run_ms"],
        "ttft_ms": pp["ttft_ms"],
        "prefill_tps": pp["prefill_tps"],
        "itl_ms": tg["itl_ms"],
        "tpot_ms": tg["tpot_ms"],
        "decode_tps": tg["decode_tps"],
        "decode_bytes_per_token": roof_tg["bytes_per_token"],
        "decode_flops_per_token": roof_tg["flops_per_token"],
        "prefill_flops": roof_pp["flops"],
        "roofline_cpu_x86": {"decode": roof_tg, "prefill": roof_pp},
        "memory": {"load": result["memory"], prompt_key: pp["memory"], decode_key: tg["memory"]},
        "ops_decode_by_role": (result.get("ops") or {}).get("decode", {}).get("by_role"),
        "warnings": result["warnings"],
    }


def speedups(rows: dict) -> dict:
    out = {}
    for kind, (dense, compressed) in PAIRS.items():
        d, c = rows[dense], rows[compressed]
        ideal_decode = d["decode_bytes_per_token"] / c["decode_bytes_per_token"]
        ideal_prefill = d["prefill_flops"] / c["prefill_flops"]
        decode_mean = d["itl_ms"]["mean"] / c["itl_ms"]["mean"]
        decode_p50 = d["itl_ms"]["p50"] / c["itl_ms"]["p50"]
        prefill_mean = d["ttft_ms"]["mean"] / c["ttft_ms"]["mean"]
        prefill_p50 = d["ttft_ms"]["p50"] / c["ttft_ms"]["p50"]
        out[kind] = {
            "dense": dense, "compressed": compressed,
            "decode": {"measured_mean_itl": decode_mean, "measured_p50_itl": decode_p50,
                       "ideal_bytes_per_token": ideal_decode, "measured_over_ideal_pct": 100 * decode_p50 / ideal_decode,
                       "measured_over_ideal_pct_mean": 100 * decode_mean / ideal_decode},
            "prefill": {"measured_mean_ttft": prefill_mean, "measured_p50_ttft": prefill_p50,
                        "ideal_flops": ideal_prefill, "measured_over_ideal_pct": 100 * prefill_p50 / ideal_prefill},
        }
    return out


def predictions(art: Path, shapes: list[Shape]) -> dict | None:
    from edgecompress.targets import profiles

    if PREDICTION_TARGET not in profiles.available():
        return None
    out = {name: predict(art / name, PREDICTION_TARGET, shapes) for name in ARTIFACTS}
    summary = {}
    for kind, (dense, compressed) in PAIRS.items():
        est = {name: {t["test"]: t for t in out[name]["tests"]} for name in (dense, compressed)}
        decode = [est[name][shapes[1].key]["decode"]["est_ms"] for name in (dense, compressed)]
        prefill = [est[name][shapes[0].key]["prefill"]["est_ms"] for name in (dense, compressed)]
        summary[kind] = {"decode_speedup_estimate": decode[0] / decode[1], "prefill_speedup_estimate": prefill[0] / prefill[1]}
    return {"label": f"prediction for {PREDICTION_TARGET} from the roofline (estimated, not measured)",
            "artifacts": out, "speedups_estimated": summary}


def markdown(record: dict) -> str:
    rows, sp = record["artifacts"], record["speedups"]
    s = record["settings"]
    lines = [f"# CPU latency, dense vs 20 % GRASP (smollm2-135m), {s['tests']}, {s['threads']} threads, "
             f"{s['repetitions']} interleaved repetitions", "",
             f"Machine: {record['machine']['cpu']}, load average at start {record['machine']['load_average_at_start']}", "",
             f"| artifact | weights MiB | TTFT {s['prompt_test']} mean / p50 ms | prefill t/s | ITL {s['decode_test']} "
             "mean / p50 / p99 ms | decode t/s | decode MiB/token (roofline) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['artifact']['weights_bytes'] / 2**20:.1f} | {r['ttft_ms']['mean']:.1f} / "
                     f"{r['ttft_ms']['p50']:.1f} | {r['prefill_tps']:.1f} | {r['itl_ms']['mean']:.2f} / "
                     f"{r['itl_ms']['p50']:.2f} / {r['itl_ms']['p99']:.2f} | {r['decode_tps']:.1f} | "
                     f"{r['decode_bytes_per_token'] / 2**20:.1f} |")
    lines += ["", "| weights | decode speedup measured (p50 / mean ITL) | ideal (bytes/token) | measured (p50) ÷ ideal | "
              "prefill speedup measured (p50 TTFT) | ideal (FLOPs) | measured (p50) ÷ ideal |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for kind, v in sp.items():
        d, p = v["decode"], v["prefill"]
        lines.append(f"| {kind} | {d['measured_p50_itl']:.3f} / {d['measured_mean_itl']:.3f} | {d['ideal_bytes_per_token']:.3f} | "
                     f"{d['measured_over_ideal_pct']:.1f} % | {p['measured_p50_ttft']:.3f} | {p['ideal_flops']:.3f} | "
                     f"{p['measured_over_ideal_pct']:.1f} % |")
    pred = record.get("prediction")
    if pred:
        lines += ["", f"{pred['label']}:", ""]
        lines += [f"| artifact | decode ms/token {s['decode_test']} (estimated) | prefill {s['prompt_test']} ms (estimated) |",
                  "| --- | --- | --- |"]
        for name, p in pred["artifacts"].items():
            tests = {t["test"]: t for t in p["tests"]}
            lines.append(f"| {name} | {tests[s['decode_test']]['decode']['est_ms']:.2f} | "
                         f"{tests[s['prompt_test']]['prefill']['est_ms']:.1f} |")
        lines += [""] + [f"- {kind}: estimated decode speedup {v['decode_speedup_estimate']:.3f}, prefill "
                         f"{v['prefill_speedup_estimate']:.3f}" for kind, v in pred["speedups_estimated"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--art", type=Path, default=Path("/tmp/art"), help="folder holding the four artifacts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--n-gen", type=int, default=128)
    parser.add_argument("--depth", type=int, default=512)
    args = parser.parse_args()

    shapes = [Shape(args.prompt, 0), Shape(0, args.n_gen, args.depth)]
    settings = ProfileSettings(shapes=shapes, repetitions=args.reps, threads=args.threads, ep="cpu", ops_steps=8)
    record = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_description()}
    started = time.perf_counter()
    results = profile_artifacts([args.art / name for name in ARTIFACTS], settings,
                                progress=lambda message: print(message, flush=True))
    record["machine"]["load_average_after"] = os.getloadavg()
    record["settings"] = {"tests": [s.key for s in shapes], "prompt_test": shapes[0].key, "decode_test": shapes[1].key,
                          "threads": args.threads, "repetitions": args.reps, "ep": "CPUExecutionProvider",
                          "warmup": settings.warmup, "order": "rep -> test -> artifact (interleaved)",
                          "speedup_statistic": "p50 (median) ITL/TTFT; means given too",
                          "memory_note": "host RSS is process-wide and all four sessions stay loaded during the "
                                         "timed runs: the per-artifact memory numbers are not separable here",
                          "seconds": round(time.perf_counter() - started, 1)}
    record["device"] = results[0]["device"]
    record["artifacts"] = {name: _strip_samples(summarize(r, shapes[0].key, shapes[1].key))
                           for name, r in zip(ARTIFACTS, results)}
    for result in results:  # the op pass's raw traces are not kept by this benchmark
        if result.get("ops"):
            shutil.rmtree(Path(result["ops"]["trace"]).parent, ignore_errors=True)
    record["speedups"] = speedups(record["artifacts"])
    record["prediction"] = _strip_samples(predictions(args.art, shapes))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latency-cpu.json").write_text(json.dumps(record, indent=1) + "\n")
    text = markdown(record)
    (RESULTS / "latency-cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
