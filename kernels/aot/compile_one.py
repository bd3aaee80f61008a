"""Compile one (kernel, dtype, sm, config) entry in a worker process and check that it can be shipped.

Everything the launcher needs (function name, parameter list, num_warps, shared bytes) is read from the
compiled kernel, never restated by hand; anything a plain cuLaunchKernel cannot honour is refused.
"""

from __future__ import annotations

import importlib
import os
import re

from . import KernelBuildError
from .ptxas import ptxas_env

# Max dynamic shared memory per block with opt-in (CUDA programming guide, compute capabilities table).
SHARED_OPTIN_BYTES = {86: 101376, 87: 166912, 89: 101376, 90: 232448}
HIDDEN_SCRATCH_PARAMS = 2  # Triton 3.9 appends global_scratch and profile_scratch pointers


def _entry_param_count(ptx: str, name: str) -> int:
    match = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.DOTALL)
    if not match:
        raise KernelBuildError(f"{name}: no .entry {name} in the PTX")
    return len(re.findall(r"\.param\s", match.group(1)))


def _ptx_isa(ptx: str) -> str:
    match = re.search(r"^\s*\.version\s+(\d+\.\d+)", ptx, re.MULTILINE)
    return match.group(1) if match else "unknown"


def _launch_problems(meta, sm: int, params: list[str], spec, n_ptx: int) -> list[str]:
    """What would keep the C++ launcher from running this cubin as configs.py describes it."""
    problems = []
    if meta.global_scratch_size or meta.profile_scratch_size:
        problems.append(
            f"needs scratch memory (global {meta.global_scratch_size}, profile {meta.profile_scratch_size})"
        )
    if meta.num_ctas != 1:
        problems.append(f"num_ctas={meta.num_ctas}")
    if meta.launch_cooperative_grid or meta.launch_pdl:
        problems.append("needs a cooperative/PDL launch")
    if meta.tensordesc_meta:
        problems.append("takes TMA tensor descriptors")
    if meta.shared > SHARED_OPTIN_BYTES[sm]:
        problems.append(f"shared {meta.shared} B > sm_{sm}'s opt-in limit {SHARED_OPTIN_BYTES[sm]} B")
    # The real runtime parameters (the signature minus constexprs, in the function's order) against configs.py's.
    if params != [name for name, _ in spec.params]:
        problems.append(f"runtime parameters {params} differ from configs.py's {[n for n, _ in spec.params]}")
    if n_ptx != len(params) + HIDDEN_SCRATCH_PARAMS:
        problems.append(f"PTX has {n_ptx} .params, expected {len(params)} + {HIDDEN_SCRATCH_PARAMS}")
    return problems


def compile_entry(kernel_name: str, dtype: str, sm: int, config: str) -> dict:
    """Compile and check; returns the table row plus 'cubin' (bytes) and 'ptx' (str)."""
    os.environ.update(ptxas_env(sm))
    import triton
    from edgecompress.kernels.triton import configs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = configs.KERNELS[kernel_name]
    fn = getattr(importlib.import_module(f"edgecompress.kernels.triton.{spec.module}"), kernel_name)
    cfg = spec.configs[config]
    signature = {name: (f"*{dtype}" if kind == "ptr" else kind) for name, kind in spec.params}
    signature.update({tile: "constexpr" for tile in spec.tiles})
    constexprs = {tile: cfg[tile] for tile in spec.tiles}
    label = f"{kernel_name}[{dtype}, sm_{sm}, {config}]"
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs),
        target=GPUTarget("cuda", sm, 32),
        options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
    )
    params = [name for name in fn.arg_names if compiled.src.signature[name] != "constexpr"]
    ptx = compiled.asm["ptx"]
    n_ptx = _entry_param_count(ptx, compiled.metadata.name)
    problems = _launch_problems(compiled.metadata, sm, params, spec, n_ptx)
    meta = compiled.metadata
    if problems:
        raise KernelBuildError(f"{label}: " + "; ".join(problems))
    return {
        "kernel": kernel_name,
        "dtype": dtype,
        "sm": sm,
        "config": config,
        "function": meta.name,
        "num_warps": meta.num_warps,
        "num_stages": cfg["num_stages"],
        "shared": meta.shared,
        "num_params": n_ptx,
        "params": [[name, signature[name]] for name in params],
        "tiles": {tile: cfg[tile] for tile in spec.tiles},
        "ptx_isa": _ptx_isa(ptx),
        "arch": meta.arch if hasattr(meta, "arch") else f"sm{sm}",
        "triton_cache_key": compiled.hash,
        "cubin": compiled.asm["cubin"],
        "ptx": ptx,
    }
