"""bench/gpu/check_kernels.py without a GPU: the dry run builds every case, and its entry-point check
runs end to end against the mock libcuda on CPU tensors (ctypes plumbing, references, tolerances)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests.kernels.cuda_build import mock_session

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "bench" / "gpu" / "check_kernels.py"


def test_dry_run_builds_every_case():
    done = subprocess.run(
        [sys.executable, "-P", str(CHECK), "--dry-run"], cwd=ROOT, capture_output=True, check=False, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    match = re.match(
        r"dry run: (\d+) entry-point cases, (\d+) JIT cases, (\d+) timing cases; .* worst relative "
        r"error ([\d.e+-]+);",
        summary,
    )
    assert match, summary
    entry, jit, timing, worst = int(match[1]), int(match[2]), int(match[3]), float(match[4])
    assert entry == 120 and jit == 15 and worst < 2e-3
    # SmolLM2 (4 shapes) + Llama-2-7B (3 shapes x 2 ranks) low-rank + Monarch/BLAST b=4/16, 7 token counts each
    assert timing == 7 * (4 + 6) + 7 * 2 * 2 * 3
    lines = done.stdout.splitlines()
    assert sum(line.startswith("time  LowRankMatMul  llama-2-7b q/k/v/o_proj r=50%") for line in lines) == 7


@pytest.fixture()
def check_module():
    spec = importlib.util.spec_from_file_location("check_kernels_under_test", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entry_point_check_runs_on_the_mock(check_module, monkeypatch):
    import torch

    session = mock_session()
    lib = check_module.load_library(session["lib_path"])  # same path: the mock-backed driver is already loaded
    mock = session["mock"]
    monkeypatch.setenv("MOCK_SM", "90")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    real_call = check_module.entry_point_call

    def with_mock_dtype(torch_, lib_, case, *args):
        mock.mock_set_dtype(check_module.ONNX_CODES[case.dtype])  # host buffers: the mock must know the dtype
        return real_call(torch_, lib_, case, *args)

    monkeypatch.setattr(check_module, "entry_point_call", with_mock_dtype)
    small = [c for c in check_module.C.correctness_cases() if c.tokens * sum(c.in_out) <= 100_000]
    monkeypatch.setattr(check_module.C, "correctness_cases", lambda: small)
    failures = []
    rows = check_module.check_entry_points(torch, lib, "cpu", failures.append)
    assert len(rows) == len(small) >= 90 and {r["dtype"] for r in rows} == {"fp32", "fp16", "bf16"}
    assert failures == [] and all(r["ok"] for r in rows)


class _HostEvent:
    """Stands in for torch.cuda.Event on CPU: wall-clock marks."""

    def __init__(self, **_):
        self.at = 0.0

    def record(self):
        import time

        self.at = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.at - self.at) * 1e3


def test_timing_rates_and_goals_run_on_cpu(check_module, monkeypatch):
    """The timing code with host stand-ins for CUDA events (graph capture unavailable -> eager): every
    variant is timed or recorded as failed, rates and goals are computed from the rows."""
    import torch
    from edgecompress.kernels.triton import configs, ops

    session = mock_session()
    lib = check_module.load_library(session["lib_path"])
    monkeypatch.setenv("MOCK_SM", "90")
    session["mock"].mock_set_dtype(10)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "Event", _HostEvent)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: (_ for _ in ()).throw(RuntimeError("no graphs on CPU")))
    peaks = check_module.device_peaks(torch, "NVIDIA H100 80GB HBM3")
    assert peaks == {"bandwidth_gbs": 3350, "tflops_fp16": 989, "source": "targets/h100.toml (datasheet)"}
    cases = [
        check_module.C.Case("LowRankMatMul", (4, 64, 16, 48), "fp16", "tiny lowrank"),
        check_module.C.Case("BlastMatMul", (4, 4, 16, 8, 12), "fp16", "tiny q/k/v/o blast b=16"),
    ]
    rows = []
    for case in cases:
        row = check_module.time_case(torch, lib, ops, configs, case, "cpu")
        check_module.add_rates(row, case, peaks)
        rows.append(row)
    low, blast = rows
    assert low["op_path"] == "m16" and set(low["ms"]) == {"op", "fused_jit", "two_pass_jit", "two_cublas", "dense"}
    assert low["ms"]["op"] > 0 and low["timing"]["op"] == "eager" and low["ms"]["two_cublas"] > 0
    assert low["ms"]["fused_jit"] is None and low["timing"]["fused_jit"].startswith("failed")  # Triton needs a GPU
    assert 0 < low["bandwidth_fraction"] and low["speedup_vs_two_cublas"] > 0 and blast["speedup_vs_dense"] > 0
    goals = check_module.goals(rows)
    assert [g["cases"] for g in goals] == [1, 0, 2, 0, 0]  # lowrank at <= 256 tokens; both at 4 tokens (bandwidth)
    assert all(isinstance(g["pass"], bool) for g in goals)
