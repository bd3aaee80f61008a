"""Launch the Triton kernels on torch tensors (2-D X, contiguous weights): the interpreter tests and the GPU
JIT cross-check use these; the shipped path is the C++ launcher, which follows the same configs.py rules.
"""

from __future__ import annotations

import torch
import triton

from . import configs
from .blast import blast_partial_kernel
from .block_diag import block_diag_kernel
from .gemm import gemm_kernel
from .lowrank import lowrank_fused_kernel
from .monarch import monarch_permute_kernel


def _launch(kernel, name: str, config: str, grid, *args):
    cfg = dict(configs.KERNELS[name].configs[config])
    kernel[grid](*args, **cfg)


def _bias_args(bias, y):
    # A never-read stand-in keeps the pointer valid when there is no bias.
    return (bias if bias is not None else y), int(bias is not None)


def low_rank_matmul(x, a, b, bias=None, path: str | None = None):
    m, k = x.shape
    r, n = b.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    path = path or configs.lowrank_path(m, k, r, n)
    bias_arg, has_bias = _bias_args(bias, y)
    if path == "two_pass":
        t = torch.empty((m, r), dtype=x.dtype, device=x.device)
        config = configs.gemm_config(m)
        tiles = configs.KERNELS["gemm_kernel"].configs[config]
        grid_t = (triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(r, tiles["BLOCK_N"]))
        _launch(gemm_kernel, "gemm_kernel", config, grid_t, x, a, t, t, m, k, r, 0)
        grid_y = (triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(n, tiles["BLOCK_N"]))
        _launch(gemm_kernel, "gemm_kernel", config, grid_y, t, b, bias_arg, y, m, r, n, has_bias)
        return y
    tiles = configs.KERNELS["lowrank_fused_kernel"].configs[path]
    grid = (triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(n, tiles["BLOCK_N"]))
    _launch(lowrank_fused_kernel, "lowrank_fused_kernel", path, grid, x, a, b, bias_arg, y, m, k, r, n, has_bias)
    return y


def _block_diag(z, w, bias, y, m, blocks, c, q):
    tiles = configs.KERNELS["block_diag_kernel"].configs["m64"]
    bias_arg, has_bias = _bias_args(bias, y)
    grid = (triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(q, tiles["BLOCK_N"]), blocks)
    _launch(block_diag_kernel, "block_diag_kernel", "m64", grid, z, w, bias_arg, y, m, blocks, c, q, has_bias)


def _two_stage(x, second, bias, first_stage):
    """Monarch and BLAST: Z [M, b, r] from the op's first stage, then Y [M, b·q] = the block-diagonal Z_k·second[k]."""
    blocks, r, q = second.shape
    m = x.shape[0]
    y = torch.empty((m, blocks * q), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    z = torch.empty((m, blocks, r), dtype=x.dtype, device=x.device)
    first_stage(z, m)
    _block_diag(z, second, bias, y, m, blocks, r, q)
    return y


def monarch_matmul(x, w1, w2, bias=None):
    blocks, p, r = w1.shape

    def permute(zp, m):
        tiles = configs.KERNELS["monarch_permute_kernel"].configs["m64"]
        grid = (triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(r, tiles["BLOCK_N"]), blocks)
        _launch(monarch_permute_kernel, "monarch_permute_kernel", "m64", grid, x, w1, zp, m, blocks, p, r)

    return _two_stage(x, w2, bias, permute)


def blast_matmul(x, u, s, v, bias=None):
    blocks, p, r = v.shape

    def partial(z, m):
        config = configs.blast_config(blocks)
        tiles = configs.KERNELS["blast_partial_kernel"].configs[config]
        grid = (triton.cdiv(m, tiles["BLOCK_M"]), triton.cdiv(r, tiles["BLOCK_R"]))
        _launch(blast_partial_kernel, "blast_partial_kernel", config, grid, x, v, s, z, m, blocks, p, r)

    return _two_stage(x, u, bias, partial)
