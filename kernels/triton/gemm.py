"""Plain Y = X·W (+ bias): the two products of LowRankMatMul's large-M path (X·A into a workspace, then ·B).

At large M the fused kernel's recomputation of X·A per N tile costs more than one round trip of the
[M, R] intermediate, so the two-kernel path stores it once (rounded to the storage dtype, as the
reference does) and reads it back.
"""

import triton
import triton.language as tl

from .tiles import add_bias, dot_k_loop, store_tile


@triton.jit
def gemm_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,  # tensors
    M, K, N, has_bias,  # sizes and flags
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = dot_k_loop(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_ptr, w_ptr, rows, cols, M, K, N, K, N, BLOCK_K)
    store_tile(y_ptr, add_bias(acc, bias_ptr, cols, N, has_bias), rows, cols, M, N, N)
