"""CPU speed of the library's LowRankMatMul against onnxruntime's own two MatMuls (the lowered form).

One SmolLM2-sized projection (576 -> 1536 at rank 128), 1 and 512 tokens, fp32 (or --dtype float16):
median of timed runs after warm-up. Our kernel is single-threaded; the MatMuls use onnxruntime's default
threads unless --ort-threads says otherwise. Needs `make kernels` first.
    .venv/bin/python bench/custom_ops_cpu.py [--k 576 --n 1536 --rank 128 --tokens 1 512]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgecompress.kernels import register


def model(fused: bool, a: np.ndarray, b: np.ndarray, onnx_type: int) -> bytes:
    x = helper.make_tensor_value_info("x", onnx_type, ["n", a.shape[0]])
    y = helper.make_tensor_value_info("y", onnx_type, ["n", b.shape[1]])
    weights = [numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")]
    if fused:
        nodes = [helper.make_node("LowRankMatMul", ["x", "A", "B"], ["y"], domain="ai.edgecompress")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "A"], ["t"]), helper.make_node("MatMul", ["t", "B"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.edgecompress", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9).SerializeToString()


def median_ms(session, x, seconds=1.0) -> float:
    for _ in range(5):
        session.run(None, {"x": x})
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 10:
        t0 = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=576)
    parser.add_argument("--n", type=int, default=1536)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--ort-threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    args = parser.parse_args()
    dtype = np.dtype(args.dtype)
    onnx_type = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((args.k, args.rank)) / 24).astype(dtype)
    b = (rng.standard_normal((args.rank, args.n)) / 11).astype(dtype)
    sessions = {}
    for fused in (True, False):
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.ort_threads  # our kernel is single-threaded either way
        if fused:
            register(options)
        sessions[fused] = ort.InferenceSession(
            model(fused, a, b, onnx_type), options, providers=["CPUExecutionProvider"]
        )
    print(
        f"{args.k}->{args.n} rank {args.rank} {args.dtype}, onnxruntime {ort.__version__}, "
        f"intra-op threads {args.ort_threads or 'default'}"
    )
    for tokens in args.tokens:
        x = rng.standard_normal((tokens, args.k)).astype(dtype)
        fused, lowered = median_ms(sessions[True], x), median_ms(sessions[False], x)
        print(
            f"  {tokens:4d} tokens: LowRankMatMul {fused:8.3f} ms   two MatMuls {lowered:8.3f} ms   ratio {fused / lowered:.2f}"
        )


if __name__ == "__main__":
    main()
