#!/usr/bin/env python3
"""GPU check of the edgecompress CUDA kernels (run by bench/gpu/check.sh on a CUDA machine).

1. Correctness through the shipped C entry points (ec_cuda_* of cuda_launch.cc/c_api.cc, launching the
   AOT cubins of kernels/build) on torch CUDA tensors and torch's current stream, every op and dtype,
   against a float64 PyTorch reference of kernels/reference.py's semantics.
2. The same kernels through Triton's JIT (edgecompress.kernels.triton.ops) as a cross-check.
3. Timings (CUDA events around CUDA-graph replays, after warm-up): the op vs two cuBLAS matmuls vs dense,
   bytes/s, FLOP/s and the roofline fraction; goals reported pass/fail.
Results: bench/results/kernels-<gpu>.json (and $OUT when set). `--dry-run` needs no GPU: it lists every
case, builds every shape and checks the torch reference against kernels/reference.py on CPU.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import cases as C

ONNX_CODES = {"fp32": 1, "fp16": 10, "bf16": 16}
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}  # relative to max(1, max |reference|)
TIME_BUDGET_S = 7 * 60


def import_kernels():
    """edgecompress.kernels from this checkout, installed or not (setup.py maps kernels/ there)."""
    try:
        return importlib.import_module("edgecompress.kernels.triton.configs").__name__
    except ImportError:
        pass
    if "edgecompress" not in sys.modules:
        try:
            importlib.import_module("edgecompress")
        except ImportError:
            pkg = types.ModuleType("edgecompress")
            pkg.__path__ = [str(ROOT / "edgecompress")]
            sys.modules["edgecompress"] = pkg
    kernels = types.ModuleType("edgecompress.kernels")
    kernels.__path__ = [str(ROOT / "kernels")]
    sys.modules["edgecompress.kernels"] = kernels
    sys.modules["edgecompress"].kernels = kernels
    return importlib.import_module("edgecompress.kernels.triton.configs").__name__


# ---------------------------------------------------------------------------------------------- library


def find_or_build_library(explicit: str | None, build_dir: Path, log) -> tuple[Path | None, str]:
    """The C entry points: --lib, else compiled here with g++ against build_dir, else a prebuilt one."""
    if explicit:
        return Path(explicit), f"given: {explicit}"
    compiler = shutil.which("g++") or shutil.which("c++")
    header = build_dir / "ec_cubins.h"
    if compiler and header.is_file():
        out = Path(tempfile.mkdtemp(prefix="ec_launch_")) / "libec_launch.so"
        cmd = [
            compiler,
            "-std=c++17",
            "-O2",
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            f"-I{build_dir}",
            str(ROOT / "kernels/csrc/cuda_launch.cc"),
            str(ROOT / "kernels/csrc/c_api.cc"),
            "-o",
            str(out),
            "-Wl,--no-undefined",
        ]
        done = subprocess.run(cmd, capture_output=True, check=False, text=True)
        if done.returncode == 0:
            return out, f"built with {compiler}"
        log(f"library build failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    for prebuilt in (build_dir / "libec_launch.so", build_dir / "libedgecompress_ops.so"):
        if prebuilt.is_file():  # check.sh --prepare / make kernels, built on the dev machine
            return prebuilt, f"prebuilt {prebuilt}"
    return None, "no C++ compiler and no prebuilt libec_launch.so / libedgecompress_ops.so"


def load_library(path: Path):
    lib = ctypes.CDLL(str(path))
    P, I64, SZ, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t, ctypes.c_int
    sigs = {
        "ec_cuda_lowrank": [I, P, P, P, P, P, P, I64, I64, I64, I64, P, SZ, ctypes.c_char_p, SZ],
        "ec_cuda_monarch": [I, P, P, P, P, P, P, I64, I64, I64, I64, I64, P, SZ, ctypes.c_char_p, SZ],
        "ec_cuda_blast": [I, P, P, P, P, P, P, P, I64, I64, I64, I64, I64, P, SZ, ctypes.c_char_p, SZ],
        "ec_cuda_lowrank_workspace_bytes": [I, I64, I64, I64, I64],
        "ec_cuda_monarch_workspace_bytes": [I, I64, I64, I64, I64, I64],
        "ec_cuda_blast_workspace_bytes": [I, I64, I64, I64, I64, I64],
        "ec_cuda_probe": [ctypes.c_char_p, SZ],
    }
    for name, args in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = SZ if name.endswith("_bytes") else I
    return lib


# ---------------------------------------------------------------------------------------------- tensors


def make_inputs(torch, case: C.Case, device, seed: int = 0):
    """(x, factors, bias) in the case's dtype; values ~N(0, 1/fan-in) keep every output O(1)."""
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[case.dtype]
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        scale = 1.0 / max(1, shape[-2] if len(shape) > 1 else 1) ** 0.5
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    if case.op == "LowRankMatMul":
        m, k, r, n = case.dims
        x, factors, n_out = rand(m, k), (rand(k, r), rand(r, n)), n
    else:
        m, b, p, r, q = case.dims
        x, n_out = rand(m, b * p), b * q
        factors = (
            (rand(b, p, r), rand(b, r, q))
            if case.op == "MonarchMatMul"
            else (rand(b, r, q), rand(b, b, r), rand(b, p, r))
        )
    bias = rand(n_out) if case.bias else None
    return x, factors, bias


def torch_reference(torch, op: str, x, factors, bias):
    """kernels/reference.py's semantics in float64 torch: fp32 accumulation is exceeded, the stored
    intermediate is rounded to the storage dtype."""
    dt = x.dtype
    xd = x.double()
    m = x.shape[0]
    if op == "LowRankMatMul":
        a, b = factors
        t = (xd @ a.double()).to(dt).double()
        y = t @ b.double()
    elif op == "MonarchMatMul":
        w1, w2 = factors
        nb, p, r = w1.shape
        z = torch.einsum("nlp,lpc->nlc", xd.reshape(m, nb, p), w1.double())
        zp = z.reshape(m, nb, nb, r // nb).transpose(1, 2).reshape(m, nb, r).to(dt).double()
        y = torch.einsum("nkc,kcq->nkq", zp, w2.double()).reshape(m, nb * w2.shape[2])
    else:
        u, s, v = factors
        nb, p, r = v.shape
        yb = torch.einsum("nlp,lpr->nlr", xd.reshape(m, nb, p), v.double())
        z = torch.einsum("nlr,lkr->nkr", yb, s.double()).to(dt).double()
        y = torch.einsum("nkr,krq->nkq", z, u.double()).reshape(m, nb * u.shape[2])
    if bias is not None:
        y = y + bias.double()
    return y


def entry_point_call(torch, lib, case: C.Case, x, factors, bias, y):
    """A closure launching the op through its C entry point on torch's current stream (workspace preallocated)."""
    code = ONNX_CODES[case.dtype]
    sizer = {
        "LowRankMatMul": lib.ec_cuda_lowrank_workspace_bytes,
        "MonarchMatMul": lib.ec_cuda_monarch_workspace_bytes,
        "BlastMatMul": lib.ec_cuda_blast_workspace_bytes,
    }[case.op]
    need = sizer(code, *case.dims)
    workspace = torch.empty(max(need, 1), dtype=torch.uint8, device=x.device)
    fn = {"LowRankMatMul": lib.ec_cuda_lowrank, "MonarchMatMul": lib.ec_cuda_monarch, "BlastMatMul": lib.ec_cuda_blast}[
        case.op
    ]
    err = ctypes.create_string_buffer(512)
    ptrs = [x.data_ptr(), *[f.data_ptr() for f in factors], bias.data_ptr() if bias is not None else None, y.data_ptr()]

    def call():
        stream = torch.cuda.current_stream().cuda_stream
        rc = fn(code, stream, *ptrs, *case.dims, workspace.data_ptr(), need, err, 512)
        if rc:
            raise RuntimeError(err.value.decode())

    return call, workspace


def jit_call(ops, case: C.Case, x, factors, bias, path=None):
    if case.op == "LowRankMatMul":
        return lambda: ops.low_rank_matmul(x, *factors, bias, path=path)
    if case.op == "MonarchMatMul":
        return lambda: ops.monarch_matmul(x, *factors, bias)
    return lambda: ops.blast_matmul(x, *factors, bias)


def max_error(torch, got, want) -> tuple[float, float]:
    if want.numel() == 0:
        return 0.0, 0.0
    return float((got.double() - want).abs().max()), float(want.abs().max())


# ---------------------------------------------------------------------------------------------- checks


def check_entry_points(torch, lib, device, log) -> list[dict]:
    rows = []
    for case in C.correctness_cases():
        x, factors, bias = make_inputs(torch, case, device, seed=hash(case.dims) % 1000)
        y = torch.full((x.shape[0], case.in_out[1]), float("nan"), dtype=x.dtype, device=device)
        row = {"op": case.op, "dims": case.dims, "dtype": case.dtype, "bias": case.bias}
        try:
            call, _ = entry_point_call(torch, lib, case, x, factors, bias, y)
            call()
            torch.cuda.synchronize()
            err, scale = max_error(torch, y, torch_reference(torch, case.op, x, factors, bias))
            row.update(max_abs_err=err, max_abs_ref=scale, ok=err <= TOLERANCE[case.dtype] * max(1.0, scale))
        except Exception as exc:  # noqa: BLE001 - every failure is a result row
            row.update(ok=False, error=str(exc).splitlines()[0])
        rows.append(row)
        if not row["ok"]:
            log(f"  FAIL entry point {case.op} {case.dims} {case.dtype} bias={case.bias}: {row.get('error', row)}")
    return rows


def check_jit(torch, ops, device, log) -> list[dict]:
    rows = []
    for case in C.jit_cases():
        x, factors, bias = make_inputs(torch, case, device, seed=7)
        row = {"op": case.op, "dims": case.dims, "dtype": case.dtype}
        try:
            y = jit_call(ops, case, x, factors, bias)()
            torch.cuda.synchronize()
            err, scale = max_error(torch, y, torch_reference(torch, case.op, x, factors, bias))
            row.update(max_abs_err=err, max_abs_ref=scale, ok=err <= TOLERANCE[case.dtype] * max(1.0, scale))
        except Exception as exc:  # noqa: BLE001
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        rows.append(row)
        if not row["ok"]:
            log(f"  FAIL jit {case.op} {case.dims} {case.dtype}: {row.get('error', row)}")
    return rows


# ---------------------------------------------------------------------------------------------- timing


def time_ms(torch, fn, target_ms: float = 20.0) -> tuple[float, str]:
    """Mean ms per call: CUDA-graph replay of a batch of calls (no CPU launch overhead), eager if capture fails."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    calls = int(max(3, min(200, target_ms / estimate)))
    try:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls, "cuda-graph"
    except Exception:  # noqa: BLE001 - capture is an optimisation; eager timing still measures the GPU
        torch.cuda.synchronize()
        for _ in range(3):
            fn()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls, "eager"


def dense_weight(torch, case: C.Case, x):
    k, n = case.in_out
    return torch.randn(k, n, device=x.device, dtype=x.dtype) / k**0.5


def time_case(torch, lib, ops, configs, case: C.Case, device) -> dict:
    x, factors, bias = make_inputs(torch, case, device, seed=1)
    y = torch.empty((case.tokens, case.in_out[1]), dtype=x.dtype, device=device)
    row = {
        "op": case.op,
        "label": case.label,
        "dims": case.dims,
        "tokens": case.tokens,
        "dtype": case.dtype,
        "meta": case.meta,
        "ms": {},
        "timing": {},
    }
    variants = {}
    if lib is not None:
        variants["op"], _ws = entry_point_call(torch, lib, case, x, factors, bias, y)
    if case.op == "LowRankMatMul":
        m, k, r, n = case.dims
        row["op_path"] = configs.lowrank_path(m, k, r, n)
        if m <= configs.LOWRANK_FUSED_M_MAX:
            variants["fused_jit"] = jit_call(
                ops, case, x, factors, bias, "m16" if m <= configs.LOWRANK_SMALL_M_MAX else "m64"
            )
        variants["two_pass_jit"] = jit_call(ops, case, x, factors, bias, "two_pass")
        a, b = factors
        variants["two_cublas"] = (
            (lambda: torch.addmm(bias, torch.mm(x, a), b)) if bias is not None else (lambda: x @ a @ b)
        )
    w = dense_weight(torch, case, x)
    variants["dense"] = (lambda: torch.addmm(bias, x, w)) if bias is not None else (lambda: x @ w)
    for name, fn in variants.items():
        try:
            row["ms"][name], row["timing"][name] = time_ms(torch, fn)
        except Exception as exc:  # noqa: BLE001
            row["ms"][name], row["timing"][name] = None, f"failed: {str(exc).splitlines()[0]}"
    return row


# ---------------------------------------------------------------------------------------------- peaks


def device_peaks(torch, name: str) -> dict:
    """Memory bandwidth and fp16 peak: from targets/*.toml when the GPU matches one, else measured."""
    import tomllib

    words = re.findall(r"[a-z0-9]+", name.lower())  # "NVIDIA H100 80GB HBM3" -> nvidia h100 80gb hbm3
    for path in sorted((ROOT / "targets").glob("*.toml")):
        profile = tomllib.loads(path.read_text())
        wanted = re.findall(r"[a-z0-9]+", str(profile.get("name", "")).lower())  # "rtx-4090" -> rtx 4090
        matches = wanted and any(words[i : i + len(wanted)] == wanted for i in range(len(words)))
        if "pcie" in words and "pcie" not in str(profile.get("description", "")).lower():
            matches = False  # e.g. h100.toml is the SXM part; the PCIe card has other peaks
        if (
            profile.get("device") == "cuda"
            and matches
            and {"memory_bandwidth_gbs", "peak_tflops_fp16"} <= profile.keys()
        ):
            return {
                "bandwidth_gbs": profile["memory_bandwidth_gbs"],
                "tflops_fp16": profile["peak_tflops_fp16"],
                "source": f"targets/{path.name} (datasheet)",
            }
    buf = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(buf)
    copy_ms, _ = time_ms(torch, lambda: dst.copy_(buf), 50.0)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    mm_ms, _ = time_ms(torch, lambda: a @ a, 50.0)
    return {
        "bandwidth_gbs": 2 * buf.numel() / copy_ms / 1e6,
        "tflops_fp16": 2 * 8192**3 / mm_ms / 1e9,
        "source": "measured here: device-to-device copy of 512 MiB; fp16 8192³ cuBLAS matmul (no matching target profile)",
    }


def add_rates(row: dict, case: C.Case, peaks: dict) -> None:
    ms = row["ms"].get("op")
    if not ms:
        return
    path = row.get("op_path", "op")
    nbytes, flops = C.op_bytes(case, "two_pass" if path == "two_pass" else "op"), C.op_flops(case)
    seconds = ms / 1e3
    roof = max(nbytes / (peaks["bandwidth_gbs"] * 1e9), flops / (peaks["tflops_fp16"] * 1e12))
    row.update(
        bytes_per_s=nbytes / seconds,
        flop_per_s=flops / seconds,
        bandwidth_fraction=nbytes / seconds / (peaks["bandwidth_gbs"] * 1e9),
        roofline_fraction=roof / seconds,
    )
    if row["ms"].get("dense"):
        row["speedup_vs_dense"] = row["ms"]["dense"] / ms
    if row["ms"].get("two_cublas"):
        row["speedup_vs_two_cublas"] = row["ms"]["two_cublas"] / ms
        if row["ms"].get("fused_jit"):
            row["fused_jit_speedup_vs_two_cublas"] = row["ms"]["two_cublas"] / row["ms"]["fused_jit"]


def goals(rows: list[dict]) -> list[dict]:
    out = []
    low = [
        r
        for r in rows
        if r["op"] == "LowRankMatMul" and r["tokens"] <= C.FUSED_GOAL_MAX_TOKENS and "speedup_vs_two_cublas" in r
    ]
    bad = [
        f"{r['label']} n={r['tokens']}: {r['speedup_vs_two_cublas']:.2f}x"
        for r in low
        if r["speedup_vs_two_cublas"] < C.FUSED_SPEEDUP_GOAL
    ]
    out.append(
        {
            "goal": f"LowRankMatMul (shipped path) >= {C.FUSED_SPEEDUP_GOAL}x two cuBLAS matmuls at <= {C.FUSED_GOAL_MAX_TOKENS} tokens",
            "pass": bool(low) and not bad,
            "cases": len(low),
            "failing": bad,
        }
    )
    fused = [r for r in low if "fused_jit_speedup_vs_two_cublas" in r]
    bad = [
        f"{r['label']} n={r['tokens']}: {r['fused_jit_speedup_vs_two_cublas']:.2f}x"
        for r in fused
        if r["fused_jit_speedup_vs_two_cublas"] < C.FUSED_SPEEDUP_GOAL
    ]
    out.append(
        {
            "goal": f"fused kernel (forced, JIT) >= {C.FUSED_SPEEDUP_GOAL}x two cuBLAS matmuls at <= {C.FUSED_GOAL_MAX_TOKENS} tokens",
            "pass": bool(fused) and not bad,
            "cases": len(fused),
            "failing": bad,
        }
    )
    bw = [r for r in rows if r["tokens"] in C.BANDWIDTH_GOAL_TOKENS and "bandwidth_fraction" in r]
    bad = [
        f"{r['op']} {r['label']} n={r['tokens']}: {r['bandwidth_fraction']:.0%}"
        for r in bw
        if r["bandwidth_fraction"] < C.BANDWIDTH_GOAL
    ]
    out.append(
        {
            "goal": f">= {C.BANDWIDTH_GOAL:.0%} of memory bandwidth at {C.BANDWIDTH_GOAL_TOKENS} tokens",
            "pass": bool(bw) and not bad,
            "cases": len(bw),
            "failing": bad,
        }
    )
    for op, want in C.PAPER_SPEEDUP_VS_DENSE.items():
        sel = [
            r
            for r in rows
            if r["op"] == op
            and r["tokens"] == C.PAPER_GOAL_TOKENS
            and "q/k/v/o" in r["label"]
            and "b=16" in r["label"]
            and "speedup_vs_dense" in r
        ]
        bad = [f"{r['label']}: {r['speedup_vs_dense']:.2f}x" for r in sel if r["speedup_vs_dense"] < want]
        out.append(
            {
                "goal": f"{op} llama-2-7b q/k/v/o b=16 at {C.PAPER_GOAL_TOKENS} tokens >= {want}x dense "
                "(proxy: the paper kernels' A40 roofline speed-up, docs §A.5)",
                "pass": bool(sel) and not bad,
                "cases": len(sel),
                "failing": bad,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------- main


def versions(torch, triton) -> dict:
    driver = "unknown"
    try:
        value = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(value))
        driver = f"CUDA driver API {value.value // 1000}.{value.value % 1000 // 10}"
        smi = shutil.which("nvidia-smi")
        if smi:
            text = (
                subprocess.run(
                    [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    check=False,
                    text=True,
                    timeout=30,
                )
                .stdout.strip()
                .splitlines()
            )
            driver += f", driver {text[0]}" if text else ""
    except OSError:
        pass
    return {
        "driver": driver,
        "cuda_runtime": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }


def dry_run(args, log) -> int:
    """No GPU: list every case, build every shape, check the torch reference against kernels/reference.py."""
    import numpy as np
    import torch

    import_kernels()
    from edgecompress.kernels import reference

    timing = C.timing_cases(Path(args.plan) if args.plan else None)
    correctness = C.correctness_cases()
    for case in correctness + C.jit_cases() + timing:
        C.check_case(case)
    worst = 0.0
    for case in correctness:
        if case.dtype == "bf16" or case.tokens * case.in_out[0] > 200_000:
            continue  # numpy has no bf16; the large shapes only cost time here
        x, factors, bias = make_inputs(torch, case, "cpu", seed=3)
        want = reference.REFERENCES[case.op](
            x.numpy(), *[f.numpy() for f in factors], None if bias is None else bias.numpy()
        )
        got = torch_reference(torch, case.op, x, factors, bias)
        if want.size:
            err = float(np.abs(got.numpy() - want.astype(np.float64)).max() / max(1.0, np.abs(want).max()))
            worst = max(worst, err)
            if err > TOLERANCE[case.dtype]:
                log(f"torch reference disagrees with kernels/reference.py: {case} rel err {err:.2e}")
                return 1
    for case in timing:
        log(f"time  {case.op:14s} {case.label:45s} dims={case.dims} bytes={C.op_bytes(case)} flops={C.op_flops(case)}")
    log(
        f"dry run: {len(correctness)} entry-point cases, {len(C.jit_cases())} JIT cases, {len(timing)} timing cases; "
        f"torch reference vs kernels/reference.py worst relative error {worst:.1e}; ranks: {timing[0].meta['rank_source']}"
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="no GPU: list and build every case")
    parser.add_argument("--build-dir", default=str(ROOT / "kernels" / "build"), help="AOT cubins (ec_cubins.h)")
    parser.add_argument("--lib", help="a library exporting the ec_cuda_* entry points (default: build one)")
    parser.add_argument("--plan", help="plan.json (or its folder) whose low-rank Linears give SmolLM2's ranks")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args(argv)
    log = lambda text: print(text, flush=True)
    if args.dry_run:
        return dry_run(args, log)

    started = time.monotonic()
    import torch
    import triton

    if not torch.cuda.is_available():
        log("error: no CUDA device visible to torch (use --dry-run on machines without a GPU)")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    configs = importlib.import_module(import_kernels())
    ops = importlib.import_module("edgecompress.kernels.triton.ops")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    cc = torch.cuda.get_device_capability(0)
    results = {
        "device": name,
        "compute_capability": f"sm_{cc[0]}{cc[1]}",
        **versions(torch, triton),
        "build_dir": args.build_dir,
    }
    manifest_path = Path(args.build_dir) / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        results["cubins"] = {"triton": manifest.get("triton_version"), "ptxas": manifest.get("ptxas")}
    log(
        f"{name} ({results['compute_capability']}), {results['driver']}, torch {torch.__version__}, triton {triton.__version__}"
    )

    if not (Path(args.build_dir) / "ec_cubins.h").is_file():
        log(f"{args.build_dir} has no cubins: generating them with this machine's Triton")
        from edgecompress.kernels.aot.generate import generate

        generate(Path(args.build_dir), jobs=min(8, os.cpu_count() or 2), log=log)
    lib_path, how = find_or_build_library(args.lib, Path(args.build_dir), log)
    results["library"] = how
    lib = None
    if lib_path:
        lib = load_library(lib_path)
        err = ctypes.create_string_buffer(512)
        if lib.ec_cuda_probe(err, 512):
            log(f"probe failed: {err.value.decode()}")
            results["probe"] = err.value.decode()
            lib = None
    log(f"C entry points: {how}{'' if lib else ' -> NOT CHECKED'}")

    results["entry_points"] = check_entry_points(torch, lib, device, log) if lib else []
    ok = sum(r["ok"] for r in results["entry_points"])
    log(f"entry points: {ok}/{len(results['entry_points'])} cases within tolerance")
    results["jit"] = check_jit(torch, ops, device, log)
    log(f"Triton JIT: {sum(r['ok'] for r in results['jit'])}/{len(results['jit'])} cases within tolerance")

    rows = []
    if not args.skip_timing:
        peaks = device_peaks(torch, name)
        results["peaks"] = peaks
        log(f"peaks: {peaks['bandwidth_gbs']:.0f} GB/s, {peaks['tflops_fp16']:.0f} TFLOP/s fp16 ({peaks['source']})")
        for case in C.timing_cases(Path(args.plan) if args.plan else None):
            if time.monotonic() - started > TIME_BUDGET_S:
                rows.append(
                    {
                        "op": case.op,
                        "label": case.label,
                        "tokens": case.tokens,
                        "dims": case.dims,
                        "skipped": "time budget",
                    }
                )
                continue
            row = time_case(torch, lib, ops, configs, case, device)
            add_rates(row, case, peaks)
            rows.append(row)
            ms = ", ".join(f"{k} {v:.4f}" for k, v in row["ms"].items() if v)
            log(f"  {case.op:14s} {case.label:42s} n={case.tokens:5d}: {ms} ms")
        results["goals"] = goals([r for r in rows if "ms" in r])
        for goal in results["goals"]:
            log(
                f"GOAL {'PASS' if goal['pass'] else 'FAIL'}: {goal['goal']} ({goal['cases']} cases"
                f"{'; failing: ' + '; '.join(goal['failing'][:6]) if goal['failing'] else ''})"
            )
    results["timings"] = rows
    results["seconds"] = round(time.monotonic() - started, 1)
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels-{slug}.json"
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    log(f"results: {path} ({results['seconds']} s)")
    failed = [r for r in results["entry_points"] + results["jit"] if not r["ok"]]
    return 1 if failed or lib is None else 0


if __name__ == "__main__":
    sys.exit(main())
