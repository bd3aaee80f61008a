"""The compiled kernel set: each kernel's runtime parameters (in order), its tile configs, and the rules
that pick a config or path at launch. The AOT generator compiles exactly this set and writes the rules'
constants into ec_cubins.h, so the C++ launch path and ops.py choose alike.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = {"fp32": 1, "fp16": 10, "bf16": 16}  # Triton pointer type -> ONNX TensorProto code
SMS = (86, 87, 89, 90)

# LowRank paths. Fused while M is small and the recomputed X·A (A re-read once per N tile) stays cheap:
# at most FUSED_MAX_REREAD times the bytes of A and B; else X·A into a workspace, then ·B.
LOWRANK_SMALL_M_MAX = 64  # M ≤ this: fused "m16"
LOWRANK_FUSED_M_MAX = 256  # M ≤ this: fused "m64"; above: two-kernel path
LOWRANK_FUSED_MAX_REREAD = 8
BLAST_MAX_BLOCKS = 16  # the fp32 accumulator is BLOCK_B x BLOCK_M x BLOCK_R registers


@dataclass(frozen=True)
class Kernel:
    name: str  # the Triton function (and cubin entry) name
    module: str  # edgecompress.kernels.triton.<module>
    param_names: str  # runtime parameters in order, space-separated: "*_ptr" are pointers, the rest i32
    tile_names: str  # constexpr names, in the order of the header's tile columns
    configs: dict  # config name -> {tile: value, "num_warps": .., "num_stages": ..}

    @property
    def params(self) -> tuple:
        """(name, "ptr" | "i32") in order (compile_one checks them against the kernel's own signature)."""
        return tuple((name, "ptr" if name.endswith("_ptr") else "i32") for name in self.param_names.split())

    @property
    def tiles(self) -> tuple:
        return tuple(self.tile_names.split())


def _cfg(num_warps=4, num_stages=2, **tiles):
    return {**tiles, "num_warps": num_warps, "num_stages": num_stages}


KERNELS = {
    k.name: k
    for k in (
        Kernel(
            "lowrank_fused_kernel",
            "lowrank",
            "x_ptr a_ptr b_ptr bias_ptr y_ptr M K R N has_bias",
            "BLOCK_M BLOCK_N BLOCK_K BLOCK_R",
            {
                "m16": _cfg(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, BLOCK_R=32),
                "m64": _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_R=64),
            },
        ),
        Kernel(
            "gemm_kernel",
            "gemm",
            "x_ptr w_ptr bias_ptr y_ptr M K N has_bias",
            "BLOCK_M BLOCK_N BLOCK_K",
            {
                "m16": _cfg(num_stages=3, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128),
                "m128": _cfg(num_stages=3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
            },
        ),
        Kernel(
            "monarch_permute_kernel",
            "monarch",
            "x_ptr w1_ptr zp_ptr M NB P R",
            "BLOCK_M BLOCK_N BLOCK_K",
            {"m64": _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)},
        ),
        Kernel(
            "block_diag_kernel",
            "block_diag",
            "z_ptr w_ptr bias_ptr y_ptr M NB C Q has_bias",
            "BLOCK_M BLOCK_N BLOCK_K",
            {"m64": _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)},
        ),
        Kernel(
            "blast_partial_kernel",
            "blast",
            "x_ptr v_ptr s_ptr z_ptr M NB P R",
            "BLOCK_M BLOCK_R BLOCK_K BLOCK_B",
            {
                "b4": _cfg(BLOCK_M=32, BLOCK_R=32, BLOCK_K=32, BLOCK_B=4),
                "b8": _cfg(BLOCK_M=32, BLOCK_R=32, BLOCK_K=32, BLOCK_B=8),
                "b16": _cfg(num_warps=8, BLOCK_M=32, BLOCK_R=32, BLOCK_K=32, BLOCK_B=16),
            },
        ),
    )
}


def lowrank_path(m: int, k: int, r: int, n: int) -> str:
    """'m16' / 'm64' (fused configs) or 'two_pass' (gemm_kernel twice through a workspace)."""
    config = "m16" if m <= LOWRANK_SMALL_M_MAX else "m64" if m <= LOWRANK_FUSED_M_MAX else None
    if config is None:
        return "two_pass"
    block_n = KERNELS["lowrank_fused_kernel"].configs[config]["BLOCK_N"]
    reread = -(-n // block_n) * k * r
    return config if reread <= LOWRANK_FUSED_MAX_REREAD * (k * r + r * n) else "two_pass"


def gemm_config(m: int) -> str:
    """gemm_kernel's config on the two-kernel path: narrow tiles at decode sizes (more programs in flight)."""
    return "m16" if m <= LOWRANK_SMALL_M_MAX else "m128"


def blast_config(blocks: int) -> str:
    """The blast_partial_kernel config whose BLOCK_B (power of two) holds `blocks` output blocks."""
    if not 1 <= blocks <= BLAST_MAX_BLOCKS:
        raise ValueError(f"BlastMatMul: b={blocks} blocks; the CUDA kernel supports 1..{BLAST_MAX_BLOCKS}")
    return "b4" if blocks <= 4 else "b8" if blocks <= 8 else "b16"
