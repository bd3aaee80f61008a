"""Run as `python -P tests/kernels/triton_interpret_cases.py`: runs the Triton kernels under TRITON_INTERPRET=1
(in its own process: the variable must be set before triton is imported, and must not leak into other
tests) and prints one JSON object: case -> result. Importing this module only defines the cases.

Each result holds the max abs error against kernels/reference.py, the reference's max |value|, the
output shape and how many kernel launches ran.
"""

from __future__ import annotations

import json
import os
import sys
import zlib

import numpy as np

# (op, dims, path or config hint); dims: lowrank (m, k, r, n); monarch (m, b, p, R, q); blast (m, b, p, r, q)
CASES = {
    "lowrank-odd": ("LowRankMatMul", (37, 96, 33, 80), None),
    "lowrank-rank1": ("LowRankMatMul", (5, 17, 1, 9), None),
    "lowrank-rank-over-in": ("LowRankMatMul", (6, 8, 12, 10), None),
    "lowrank-n1": ("LowRankMatMul", (1, 64, 16, 48), None),
    "lowrank-m64-path": ("LowRankMatMul", (70, 40, 20, 30), "m64"),
    "lowrank-two-pass": ("LowRankMatMul", (300, 24, 7, 19), "two_pass"),
    "lowrank-two-pass-decode": ("LowRankMatMul", (2, 40, 7, 19), "two_pass"),
    "lowrank-empty": ("LowRankMatMul", (0, 16, 4, 8), None),
    "monarch-odd": ("MonarchMatMul", (37, 4, 24, 8, 20), None),
    "monarch-b1": ("MonarchMatMul", (3, 1, 16, 4, 8), None),
    "monarch-ragged": ("MonarchMatMul", (9, 3, 5, 6, 7), None),
    "monarch-n1": ("MonarchMatMul", (1, 2, 33, 6, 65), None),
    "monarch-empty": ("MonarchMatMul", (0, 2, 8, 4, 8), None),
    "blast-b4": ("BlastMatMul", (37, 4, 24, 6, 20), None),
    "blast-b5": ("BlastMatMul", (7, 5, 9, 3, 11), None),
    "blast-b16": ("BlastMatMul", (3, 16, 4, 5, 3), None),
    "blast-b1-n1": ("BlastMatMul", (1, 1, 40, 1, 33), None),
    "blast-empty": ("BlastMatMul", (0, 3, 4, 2, 5), None),
}
DTYPES = {"fp32": np.float32, "fp16": np.float16}  # bf16: the interpreter's tl.dot is wrong (see docs)


def _factors(op, dims, rng, dtype):
    def rand(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1)).astype(dtype)

    if op == "LowRankMatMul":
        m, k, r, n = dims
        return rand(m, k), (rand(k, r), rand(r, n)), n
    m, b, p, r, q = dims
    if op == "MonarchMatMul":
        return rand(m, b * p), (rand(b, p, r), rand(b, r, q)), b * q
    return rand(m, b * p), (rand(b, r, q), rand(b, b, r), rand(b, p, r)), b * q


def run_case(name, dtype_name, with_bias, launches):
    import torch
    from edgecompress.kernels import reference
    from edgecompress.kernels.triton import ops

    op, dims, path = CASES[name]
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(zlib.crc32(f"{name}/{dtype_name}/{with_bias}".encode()))
    x, factors, n_out = _factors(op, dims, rng, dtype)
    bias = rng.standard_normal(n_out).astype(dtype) if with_bias else None
    tensors = [torch.from_numpy(f) for f in factors]
    tbias = torch.from_numpy(bias) if bias is not None else None
    launches.clear()
    if op == "LowRankMatMul":
        y = ops.low_rank_matmul(torch.from_numpy(x), *tensors, tbias, path=path)
    elif op == "MonarchMatMul":
        y = ops.monarch_matmul(torch.from_numpy(x), *tensors, tbias)
    else:
        y = ops.blast_matmul(torch.from_numpy(x), *tensors, tbias)
    want = reference.REFERENCES[op](x, *factors, bias).astype(np.float64)
    got = y.numpy().astype(np.float64)
    err = float(np.abs(got - want).max()) if want.size else 0.0
    return {
        "max_abs_err": err,
        "max_abs_ref": float(np.abs(want).max()) if want.size else 0.0,
        "shape": list(got.shape),
        "want_shape": list(want.shape),
        "launches": list(launches),
    }


def main():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: this is its own process
    from edgecompress.kernels.triton import ops

    launches = []
    real_launch = ops._launch

    def counting(kernel, name, config, grid, *args):
        launches.append(f"{name}:{config}")
        return real_launch(kernel, name, config, grid, *args)

    ops._launch = counting
    results = {}
    for name in CASES:
        for dtype_name in DTYPES:
            for with_bias in (False, True):
                results[f"{name}/{dtype_name}/{'bias' if with_bias else 'nobias'}"] = run_case(
                    name, dtype_name, with_bias, launches
                )
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
