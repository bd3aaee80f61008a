"""LowRankMatMul, fused: Y = (X·A)·B + bias with the X·A tile kept on chip.

One program owns a [BLOCK_M, BLOCK_N] tile of Y and walks R in BLOCK_R chunks: t = X[rows]·A[:, chunk]
(over K in BLOCK_K steps), rounded to the storage dtype as the reference stores it, then acc += t·B[chunk,
cols]. R is a runtime argument, so one cubin serves every rank; masked loads give zeros past every edge.
Every N tile recomputes its X·A (re-reading A, normally from L2): see configs.lowrank_path.
"""

import triton
import triton.language as tl

from .tiles import add_bias, dot_k_loop, store_tile


@triton.jit
def lowrank_fused_kernel(
    x_ptr, a_ptr, b_ptr, bias_ptr, y_ptr,  # tensors
    M, K, R, N, has_bias,  # sizes and flags
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + rs
        t = dot_k_loop(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), x_ptr, a_ptr, rows, rr, M, K, R, K, R, BLOCK_K)
        bt = tl.load(b_ptr + rr[:, None] * N + cols[None, :], mask=(rr[:, None] < R) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(t.to(x_ptr.dtype.element_ty), bt, acc, input_precision="ieee")
    store_tile(y_ptr, add_bias(acc, bias_ptr, cols, N, has_bias), rows, cols, M, N, N)
