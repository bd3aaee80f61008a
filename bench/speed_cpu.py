"""CPU speed benchmark (issue 26, stage 4): smollm2-135m as `edgecompress build` makes it, against llama.cpp on the
same GGUF, every row in one interleaved run.

Rows (each an artifact built by the pipeline, verified like a user's build): dense fp32; fused fp32; fused int4 in
each weight format (our exact Q4_1 blocks; onnxruntime's RTN and HQQ quantizers on the same fp32 export, then the
same fusions, bench/weight_formats.py); `--method` at 20 % fused int4; and llama.cpp (llama-cpp-python built from
source, the Makefile's bench-deps) on the shipped GGUF itself. Measured for every row, 2 threads, rows interleaved
round by round (round 0 is warm-up) so the machine's drift spreads over all of them:
- prefill of 128 and 512 tokens from an empty cache (onnxruntime: last position's logits only, as generate runs);
- decode at depth 0, 512 and 2048: that many tokens prefilled untimed, then `--steps` greedy steps timed one by one
  (onnxruntime through runtimes.kv_steps as generate drives it: the cache written in place where the artifact
  allows it; llama.cpp through eval());
- medians over rounds of each round's median, the spread (min/max of the round medians) and tokens/s;
- perplexity on the same `--windows` WikiText-2 test windows, from each runtime's own logits on the same ids;
- this machine's memory bandwidth (a large numpy copy, read + write bytes per second) and, per row and depth, the
  bytes a decoded token must read (weights it multiplies, the KV cache at that depth) ÷ that bandwidth: the
  physical limit its decode time is compared with.
The load average before and after the timing goes in the file. Writes bench/results/speed-cpu.{json,md}.

Usage: python bench/speed_cpu.py [--work DIR] [--threads 2] [--windows 40] [--steps 32] [--repeats 3]
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
from speed_rows import LLAMA_CPP, build_rows, decode_bytes, llama_cpp_decode_bytes, shipped_gguf  # noqa: E402

from edgecompress.report import machine_description

RESULTS = Path(__file__).parent / "results" / "speed-cpu.json"
PREFILLS = (128, 512)
DEPTHS = (0, 512, 2048)
VOCAB = 49152


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by the fastest of `repeats` copies of a `gib` GiB array."""
    source = np.ones(int(gib * 2**30) // 8, np.float64)
    target = np.empty_like(source)
    best = min(_timed(lambda: np.copyto(target, source)) for _ in range(repeats))
    return 2 * source.nbytes / best


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


class OrtRow:
    """Prefill and decode calls on one artifact through the runtime's decoder and step classes."""

    def __init__(self, folder: Path, threads: int):
        from edgecompress.runtimes.decoder import OrtDecoder

        self.decoder = OrtDecoder(folder, threads=threads)

    def prefill(self, ids: list[int]) -> None:
        d = self.decoder
        d.forward(np.asarray([ids]), np.ones((1, len(ids)), np.int64), np.arange(len(ids))[None], d.empty_cache(1),
                  last_only=True)

    def decode(self, ids: list[int], steps: int) -> list[float]:
        from edgecompress.runtimes.kv_steps import make_steps

        step = make_steps(self.decoder, capacity=len(ids) + steps)
        token = int(np.argmax(step(ids)))
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            token = int(np.argmax(step([token])))
            times.append(time.perf_counter() - started)
        return times


class LlamaCppRow:
    def __init__(self, gguf: Path, threads: int, context: int):
        from llama_cpp import Llama

        self.llm = Llama(str(gguf), n_ctx=context, n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def _last_logits(self) -> np.ndarray:
        """The last evaluated token's logits, read from the context (eval keeps none without logits_all)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def decode(self, ids: list[int], steps: int) -> list[float]:
        self.prefill(ids)
        token = int(np.argmax(self._last_logits()))
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            self.llm.eval([token])
            token = int(np.argmax(self._last_logits()))
            times.append(time.perf_counter() - started)
        return times


def tests(steps: int) -> list[tuple[str, object]]:
    rng = np.random.default_rng(0)
    ids = rng.integers(100, VOCAB - 100, max(*PREFILLS, *DEPTHS)).tolist()
    chosen = [(f"prefill {n}", ("prefill", ids[:n])) for n in PREFILLS]
    return chosen + [(f"decode at depth {d}", ("decode", ids[:max(d, 1)])) for d in DEPTHS]


def interleaved(runners: dict, steps: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """name -> test -> per-round ms (a decode round: the median of its steps), round 0 dropped."""
    samples = {name: {} for name in runners}
    order = list(runners)
    for round_index in range(repeats + 1):
        for name in order[round_index % len(order):] + order[:round_index % len(order)]:
            for test, (kind, ids) in tests(steps):
                if kind == "prefill":
                    value = _timed(lambda: runners[name].prefill(ids))
                else:
                    value = statistics.median(runners[name].decode(ids, steps))
                if round_index:
                    samples[name].setdefault(test, []).append(1000 * value)
        print(f"round {round_index} done", flush=True)
    return samples


def summary(values: list[float], tokens: int) -> dict:
    median = statistics.median(values)
    return {"median_ms": round(median, 3), "min_ms": round(min(values), 3), "max_ms": round(max(values), 3),
            "rounds": len(values), "tokens_per_s": round(1000 * tokens / median, 2)}


def quality(name: str, row: dict, gguf: Path, dense: Path, threads: int, windows: int) -> dict:
    if name == LLAMA_CPP:
        from speed_rows import llama_cpp_perplexity

        return llama_cpp_perplexity(gguf, dense, threads, windows)
    from edgecompress.runtimes.perplexity import perplexity

    scored = perplexity(Path(row["artifact"]), limit=windows, threads=threads)
    return {"perplexity": round(scored["perplexity"], 4), "perplexity_windows": scored["windows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="where the artifacts go (kept; reused when present)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
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
                           "build_options": {"CMAKE_ARGS": os.environ.get("EC_LLAMA_CMAKE_ARGS", "see Makefile")}}
        bandwidth = copy_bandwidth()
        record["machine"]["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 2)
        record["settings"] = {"threads": args.threads, "repeats": args.repeats, "decode_steps": args.steps,
                              "perplexity_windows": args.windows, "prefills": PREFILLS, "depths": DEPTHS,
                              "statistic": "median over rounds (a decode round: its steps' median); min/max of rounds",
                              "order": "rounds rotate the row order; round 0 is warm-up and dropped"}
        runners = {name: OrtRow(Path(row["artifact"]), args.threads) for name, row in rows.items() if name != LLAMA_CPP}
        runners[LLAMA_CPP] = LlamaCppRow(gguf, args.threads, max(DEPTHS) + args.steps + 8)
        for name, runner in runners.items():
            rows[name]["kv_cache"] = ("written in place" if getattr(getattr(runner, "decoder", None), "shares_kv_buffer",
                                                                   False) else "llama.cpp's" if name == LLAMA_CPP
                                      else "copied every step")
        record["load_average_before_timing"] = os.getloadavg()
        samples = interleaved(runners, args.steps, args.repeats)
        record["load_average_after_timing"] = os.getloadavg()
        del runners
        for name, row in rows.items():
            reads = llama_cpp_decode_bytes(gguf) if name == LLAMA_CPP else decode_bytes(Path(row["artifact"]))
            row["timing"] = {}
            for test, values in samples[name].items():
                tokens = int(test.split()[-1]) if test.startswith("prefill") else 1
                row["timing"][test] = summary(values, tokens)
                if test.startswith("decode"):
                    depth = int(test.split()[-1])
                    needed = reads["weights"] + reads["kv_per_token"] * depth
                    limit_ms = 1000 * needed / bandwidth
                    row["timing"][test].update(bytes_read=needed, physical_limit_ms=round(limit_ms, 3),
                                               of_physical_limit=round(limit_ms / row["timing"][test]["median_ms"], 3))
            row["decode_bytes"] = reads
            print(name, json.dumps({k: v["median_ms"] for k, v in row["timing"].items()}), flush=True)
        dense = Path(rows["dense fp32"]["artifact"])
        for name, row in rows.items():
            row.update(quality(name, row, gguf, dense, args.threads, args.windows))
            print(name, "perplexity", row["perplexity"], flush=True)
        record["rows"] = rows
        record["ratios_vs_llama_cpp"] = ratios(rows)
    record["machine"]["load_average_at_end"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2, default=str) + "\n")
    RESULTS.with_suffix(".md").write_text(markdown_table(record))
    print(f"wrote {RESULTS} and its table")


def ratios(rows: dict) -> dict:
    """Per row: llama.cpp's time ÷ the row's (above 1: faster than llama.cpp) per test, and perplexity ÷ llama.cpp's."""
    reference = rows[LLAMA_CPP]
    return {name: {test: round(reference["timing"][test]["median_ms"] / value["median_ms"], 3)
                   for test, value in row["timing"].items()}
            | {"perplexity": round(row["perplexity"] / reference["perplexity"], 4)}
            for name, row in rows.items() if name != LLAMA_CPP}


def markdown_table(record: dict) -> str:
    tests_ = list(next(iter(record["rows"].values()))["timing"])
    head = ["artifact", "weights MB", "KV cache", *[f"{t} (ms)" for t in tests_], "decode 512 of physical limit",
            "WikiText-2 ppl", "vs llama.cpp: prefill 512 / decode 512 speed, ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, row in record["rows"].items():
        versus = record["ratios_vs_llama_cpp"].get(name)
        cell = (f"{versus['prefill 512']:.2f}x / {versus['decode at depth 512']:.2f}x, {versus['perplexity']:.4f}x"
                if versus else "reference")
        timings = [f"{row['timing'][t]['median_ms']:.1f} ({row['timing'][t]['min_ms']:.1f}-"
                   f"{row['timing'][t]['max_ms']:.1f})" for t in tests_]
        limit = row["timing"]["decode at depth 512"]["of_physical_limit"]
        lines.append(f"| {name} | {row['weights_bytes'] / 1e6:.0f} | {row['kv_cache']} | " + " | ".join(timings)
                     + f" | {limit:.0%} | {row['perplexity']:.2f} | {cell} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
