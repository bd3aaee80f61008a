"""Second product of Monarch and BLAST: Y[:, k·q:(k+1)·q] = Z[:, k, :]·W[k] (+ bias), Z = [M, b, C].

Grid (row tiles, column tiles of q, output block k); each block's result is stored at its final columns
of the [M, b·q] output, so there is no trailing permutation or copy.
"""

import triton
import triton.language as tl

from .tiles import add_bias, dot_k_loop, store_tile


@triton.jit
def block_diag_kernel(
    z_ptr, w_ptr, bias_ptr, y_ptr,  # tensors
    M, NB, C, Q, has_bias,  # sizes and flags
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    blk = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = dot_k_loop(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), z_ptr + blk * C, w_ptr + blk * C * Q, rows, cols,
                     M, C, Q, NB * C, Q, BLOCK_K)
    acc = add_bias(acc, bias_ptr + blk * Q, cols, Q, has_bias)
    store_tile(y_ptr + blk * Q, acc, rows, cols, M, Q, NB * Q)
