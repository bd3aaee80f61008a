"""The Triton kernels under the interpreter (TRITON_INTERPRET=1, CPU torch tensors) vs kernels/reference.py.

All cases run in one subprocess (tests/kernels/triton_interpret_cases.py) so the interpreter variable
never reaches this process. bf16 is not run: Triton 3.9's interpreter computes tl.dot on bf16 wrongly
(errors of ~1e10 on a 16x16 product), so bf16 is covered by the mock launch path and bench/gpu instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels.triton_interpret_cases import CASES, DTYPES

ROOT = Path(__file__).resolve().parents[2]
# Relative to max(1, max |reference|): fp32 accumulates in a different order than float64; fp16 also
# rounds the output (2^-11) and, rarely, the stored intermediate one ulp the other way.
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3}
EXPECTED_LAUNCHES = {
    "LowRankMatMul": None,  # depends on the path, checked below
    "MonarchMatMul": ["monarch_permute_kernel:m64", "block_diag_kernel:m64"],
    "BlastMatMul": None,
}


@pytest.fixture(scope="module")
def interpreted():
    done = subprocess.run(
        [sys.executable, "-P", str(ROOT / "tests" / "kernels" / "triton_interpret_cases.py")],
        cwd=ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


CASE_KEYS = [f"{name}/{dtype}/{bias}" for name in CASES for dtype in DTYPES for bias in ("nobias", "bias")]


@pytest.mark.parametrize("key", CASE_KEYS)
def test_kernel_matches_reference(interpreted, key):
    name, dtype, _ = key.split("/")
    result = interpreted[key]
    assert result["shape"] == result["want_shape"]
    scale = max(1.0, result["max_abs_ref"])
    assert result["max_abs_err"] <= TOLERANCE[dtype] * scale, result
    op, dims, path = CASES[name]
    if dims[0] == 0:
        assert result["launches"] == []  # an empty batch launches nothing
        return
    if op == "LowRankMatMul":
        gemm = f"gemm_kernel:{'m16' if dims[0] <= 64 else 'm128'}"
        want = [gemm] * 2 if path == "two_pass" else [f"lowrank_fused_kernel:{path or 'm16'}"]
    elif op == "MonarchMatMul":
        want = EXPECTED_LAUNCHES[op]
    else:
        blocks = dims[1]
        want = [
            f"blast_partial_kernel:{'b4' if blocks <= 4 else 'b8' if blocks <= 8 else 'b16'}",
            "block_diag_kernel:m64",
        ]
    assert result["launches"] == want


def test_lowrank_path_rule():
    from edgecompress.kernels.triton import configs

    assert configs.lowrank_path(1, 576, 288, 1536) == "m16"  # SmolLM2-sized decode: fused
    assert configs.lowrank_path(128, 576, 288, 1536) == "m64"
    assert configs.lowrank_path(1024, 576, 288, 1536) == "two_pass"
    # Llama-7B q/k/v/o at half rank: every N tile would re-read all of A; two kernels read it once.
    assert configs.lowrank_path(1, 4096, 2048, 4096) == "two_pass"
    with pytest.raises(ValueError, match="b=17"):
        configs.blast_config(17)
