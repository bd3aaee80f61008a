"""Sibling projections packed into one matmul (PackProjectionsPass, issue 26 stage 3: node count) against the same
artifact unpacked, in one interleaved run.

Input: a fused artifact built without the pass (an earlier version's `edgecompress build smollm2-135m --weights
int4`). Its packed twin is that graph with PackProjectionsPass applied (q/k/v into GroupQueryAttention's packed
QKV, gate/up into one MatMulNBits and a Split), saved beside it. Measured on both, 2 threads, rounds rotating the
order, round 0 dropped: a 512-token prefill (last position's logits) and decode at depth 0, 512 and 2048 through
the runtime's steps (the cache written in place); greedy tokens compared; perplexity on the same WikiText-2 windows
(EDGECOMPRESS_DATA). Writes bench/results/pack-projections.json.

    python bench/pack_projections.py UNPACKED_ARTIFACT [--steps 64] [--repeats 5] [--windows 40]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: -P (PYTHONSAFEPATH) leaves it off
from kv_cache import one_request  # noqa: E402

from edgecompress import contract
from edgecompress.report import machine_description

RESULTS = Path(__file__).resolve().parent / "results" / "pack-projections.json"
DEPTHS = (0, 512, 2048)


def packed_copy(artifact: Path, into: Path) -> dict:
    import onnx_ir as ir

    from edgecompress.passes.pack_projections import PackProjectionsPass

    into.mkdir(parents=True)
    for entry in artifact.iterdir():
        if entry.is_file() and entry.name not in (contract.MODEL_FILE, contract.DATA_FILE):
            shutil.copy(entry, into / entry.name)
    model = ir.load(str(artifact / contract.MODEL_FILE))
    result = PackProjectionsPass()(model)
    ir.save(model, str(into / contract.MODEL_FILE), external_data=contract.DATA_FILE)
    return result.summary()


def node_counts(folder: Path) -> dict:
    import onnx

    model = onnx.load(str(folder / contract.MODEL_FILE), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    return {"nodes": len(model.graph.node), "MatMulNBits": ops["MatMulNBits"], "MatMul": ops["MatMul"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=40)
    args = parser.parse_args()
    from edgecompress.runtimes.decoder import OrtDecoder

    with tempfile.TemporaryDirectory(prefix="ec-pack-") as tmp:
        folders = {"unpacked": args.artifact, "packed": Path(tmp) / "packed"}
        pass_stats = packed_copy(args.artifact, folders["packed"])
        decoders = {label: OrtDecoder(folder, threads=args.threads) for label, folder in folders.items()}
        load_before = os.getloadavg()
        rng = np.random.default_rng(0)
        prompt = rng.integers(100, 40000, max(DEPTHS)).tolist()
        samples = {label: {} for label in folders}
        tokens = {}
        order = list(folders)
        for repeat in range(args.repeats + 1):
            for label in order[repeat % 2:] + order[:repeat % 2]:
                decoder = decoders[label]
                started = time.perf_counter()
                decoder.forward(np.asarray([prompt[:512]]), np.ones((1, 512), np.int64), np.arange(512)[None],
                                decoder.empty_cache(1), last_only=True)
                values = {"prefill 512": 1000 * (time.perf_counter() - started)}
                for depth in DEPTHS:
                    times, tokens[label, depth] = one_request(decoder, True, prompt[:max(depth, 1)], args.steps)
                    values[f"decode at depth {depth}"] = statistics.median(times)
                if repeat:
                    for test, value in values.items():
                        samples[label].setdefault(test, []).append(value)
        load_after = os.getloadavg()
        medians = {label: {test: round(statistics.median(v), 3) for test, v in tests.items()}
                   for label, tests in samples.items()}
        perplexity = {}
        if args.windows:
            from edgecompress import api

            perplexity = {label: api.eval(folder, limit=args.windows)["perplexity"] for label, folder in folders.items()}
        result = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_description(),
            "load_average_before": list(load_before), "load_average_after": list(load_after),
            "artifact": str(args.artifact),
            "pass": pass_stats,
            "graph": {label: node_counts(folder) for label, folder in folders.items()},
            "settings": {"threads": args.threads, "steps": args.steps, "repeats": args.repeats,
                         "statistic": "median over rounds (a decode round: its steps' median)"},
            "ms": medians,
            "rounds_ms": samples,
            "speedup": {test: round(medians["unpacked"][test] / medians["packed"][test], 3)
                        for test in medians["packed"]},
            "greedy_identical": all(tokens["packed", d] == tokens["unpacked", d] for d in DEPTHS),
            "perplexity": perplexity, "perplexity_windows": args.windows,
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("graph", "ms", "speedup", "greedy_identical", "perplexity")}, indent=1))


if __name__ == "__main__":
    main()
