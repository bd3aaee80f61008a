"""BlastMatMul, "partial" fusion (first stage): z[n, k, :] = Σ_l (X_l·V[l]) ⊙ S[l, k] for all k at once.

Grid (row tiles, rank tiles). For each input block l, y = X_l·V[l][:, rank tile] stays on chip (fp32) and
is immediately mixed into a [BLOCK_B, BLOCK_M, BLOCK_R] fp32 accumulator for every output block k
(BLOCK_B = b rounded up to a power of two, b ≤ 16). Only z ([M, b, r], rounded to the storage dtype)
is written; block_diag_kernel then computes Y_k = z_k·U[k] into the final layout.
"""

import triton
import triton.language as tl

from .tiles import dot_k_loop


@triton.jit
def blast_partial_kernel(
    x_ptr, v_ptr, s_ptr, z_ptr,  # tensors
    M, NB, P, R,  # sizes and flags
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    outs = tl.arange(0, BLOCK_B)
    acc = tl.zeros((BLOCK_B, BLOCK_M, BLOCK_R), dtype=tl.float32)
    for blk in range(NB):
        y = dot_k_loop(tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), x_ptr + blk * P, v_ptr + blk * P * R, rows, rr,
                       M, P, R, NB * P, R, BLOCK_K)
        st = tl.load(
            s_ptr + blk * NB * R + outs[:, None] * R + rr[None, :],
            mask=(outs[:, None] < NB) & (rr[None, :] < R),
            other=0.0,
        ).to(tl.float32)
        acc += st[:, None, :] * y[None, :, :]
    offs = rows[None, :, None] * (NB * R) + outs[:, None, None] * R + rr[None, None, :]
    mask = (outs[:, None, None] < NB) & (rows[None, :, None] < M) & (rr[None, None, :] < R)
    tl.store(z_ptr + offs, acc.to(z_ptr.dtype.element_ty), mask=mask)
