"""Second product of Monarch and BLAST: Y[:, k·q:(k+1)·q] = Z[:, k, :]·W[k] (+ bias), Z = [M, b, C].

Grid (row tiles, column tiles of q, output block k); each block's result is stored at its final columns
of the [M, b·q] output, so there is no trailing permutation or copy.
"""

import triton
import triton.language as tl


@triton.jit
def block_diag_kernel(
    z_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    M,
    NB,
    C,
    Q,
    has_bias,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    blk = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + ks
        zt = tl.load(
            z_ptr + rows[:, None] * (NB * C) + blk * C + kk[None, :],
            mask=(rows[:, None] < M) & (kk[None, :] < C),
            other=0.0,
        )
        wt = tl.load(
            w_ptr + blk * C * Q + kk[:, None] * Q + cols[None, :],
            mask=(kk[:, None] < C) & (cols[None, :] < Q),
            other=0.0,
        )
        acc = tl.dot(zt, wt, acc, input_precision="ieee")
    if has_bias != 0:
        acc += tl.load(bias_ptr + blk * Q + cols, mask=cols < Q, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * (NB * Q) + blk * Q + cols[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=(rows[:, None] < M) & (cols[None, :] < Q),
    )
