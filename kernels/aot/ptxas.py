"""Which ptxas compiles each SM, and its version (recorded in the manifest).

sm_87 (Jetson Orin, JetPack 6.1/6.2 = CUDA 12.6 driver) and sm_90 use ptxas 12.6.85 from the PyPI wheel
nvidia-cuda-nvcc-cu12 when it is installed: its cubins (ELF ABI 7, toolkit 12.6, PTX ISA 8.5) match
JetPack 6's driver, and for sm_90 they avoid the ABI-8 cubins of Triton's bundled ptxas 13.x, which only
CUDA-13 drivers (>= 580) load. Otherwise, and for sm_86/89, Triton's bundled ptxas is used.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

PINNED_PTXAS_SMS = (87, 90)


def pinned_ptxas() -> str | None:
    """bin/ptxas of the installed nvidia-cuda-nvcc-cu12 wheel, or None."""
    try:
        spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    except ModuleNotFoundError:
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "bin" / "ptxas"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def bundled_ptxas(sm: int) -> str:
    import triton

    name = "ptxas" if sm < 90 else "ptxas-blackwell"  # Triton's own choice (get_ptxas)
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def ptxas_for(sm: int) -> tuple[str, str]:
    """(path, origin) for this SM; origin is 'nvidia-cuda-nvcc-cu12' or 'triton-bundled'."""
    pinned = pinned_ptxas() if sm in PINNED_PTXAS_SMS else None
    return (pinned, "nvidia-cuda-nvcc-cu12") if pinned else (bundled_ptxas(sm), "triton-bundled")


def ptxas_env(sm: int) -> dict[str, str]:
    """The Triton knob that makes it use ptxas_for(sm) (TRITON_PTXAS_PATH below sm_90, else _BLACKWELL_)."""
    path, _ = ptxas_for(sm)
    return {"TRITON_PTXAS_PATH" if sm < 90 else "TRITON_PTXAS_BLACKWELL_PATH": path}


def ptxas_version(path: str) -> str:
    """`ptxas --version` in one line, e.g. "Cuda compilation tools, release 12.6, V12.6.85; Build cuda_12.6..."."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        from . import KernelBuildError

        raise KernelBuildError(f"cannot run {path} --version: {exc}") from exc
    return "; ".join(line for line in out.strip().splitlines()[-2:])
