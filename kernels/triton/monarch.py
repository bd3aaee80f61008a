"""MonarchMatMul, first product: Z_l = X_l·W1[l], stored straight into the permuted layout Zp.

Grid (row tiles, channel tiles, input block l). Channel c = k·s + t of input block l belongs to output
block k at position l·s + t, so the tile is scattered to Zp[n, k, l·s + t] (Zp is [M, b, R], the layout
block_diag_kernel reads): the stride permutation costs no extra pass. Zp is rounded to the storage dtype.
"""

import triton
import triton.language as tl

from .tiles import dot_k_loop


@triton.jit
def monarch_permute_kernel(
    x_ptr, w1_ptr, zp_ptr, M, NB, P, R, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    blk = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = dot_k_loop(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_ptr + blk * P, w1_ptr + blk * P * R, rows, chans,
                     M, P, R, NB * P, R, BLOCK_K)
    s = R // NB
    dest = (chans // s) * R + blk * s + chans % s  # the stride permutation
    tl.store(
        zp_ptr + rows[:, None] * (NB * R) + dest[None, :],
        acc.to(zp_ptr.dtype.element_ty),
        mask=(rows[:, None] < M) & (chans[None, :] < R),
    )
