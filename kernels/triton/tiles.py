"""The tile loops every kernel shares, written once (Triton inlines these into each kernel that calls them).

`dot_k_loop` walks K in BLOCK_K steps: acc += A[rows, :K] · B[:K, cols], with A's rows `a_stride` apart and
B's rows `b_stride` apart (pointers already moved to the block a kernel works on), fp32 accumulation in IEEE
precision, and zeros loaded past every edge, so ragged M, K and N need no padding. `add_bias` and
`store_tile` finish a [rows, cols] tile: bias in fp32, then rounding to the output's storage dtype.
"""

import triton
import triton.language as tl


@triton.jit
def dot_k_loop(acc, a_ptr, b_ptr, rows, cols, M, K, N, a_stride, b_stride, BLOCK_K: tl.constexpr):
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        at = tl.load(a_ptr + rows[:, None] * a_stride + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < K),
                     other=0.0)
        bt = tl.load(b_ptr + kk[:, None] * b_stride + cols[None, :], mask=(kk[:, None] < K) & (cols[None, :] < N),
                     other=0.0)
        acc = tl.dot(at, bt, acc, input_precision="ieee")
    return acc


@triton.jit
def add_bias(acc, bias_ptr, cols, N, has_bias):
    if has_bias != 0:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def store_tile(y_ptr, acc, rows, cols, M, N, y_stride):
    tl.store(y_ptr + rows[:, None] * y_stride + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))
