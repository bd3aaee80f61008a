"""The CUDA launch path (cuda_launch.cc + c_api.cc) against the mock libcuda, through the C entry points
with host buffers: which cubin each SM gets, grid/block/shared/parameter count, outputs vs
kernels/reference.py (the mock evaluates each kernel from params[] in Triton's order), and the errors.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from edgecompress.kernels import reference

from tests.kernels.cuda_build import launch_library, mock_session

FP32, FP16, BF16 = 1, 10, 16
DTYPE_NAMES = {FP32: "fp32", FP16: "fp16", BF16: "bf16"}
# Relative to max(1, max |reference|). bf16: the reference rounds its intermediate to fp32, the kernel
# (and the mock) to bf16, so bf16 gets its own, looser bound.
TOLERANCE = {FP32: 1e-5, FP16: 2e-3, BF16: 3e-2}
FAKE_STREAM = 0x5EED  # any non-null handle: the mock maps every stream to the device's context
P, I64, SZ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t


@pytest.fixture(scope="module")
def cuda():
    session = mock_session()
    lib = session["lib"]
    for name, args in {
        "ec_cuda_lowrank": [ctypes.c_int, P, P, P, P, P, P, I64, I64, I64, I64, P, SZ, ctypes.c_char_p, SZ],
        "ec_cuda_monarch": [ctypes.c_int, P, P, P, P, P, P, I64, I64, I64, I64, I64, P, SZ, ctypes.c_char_p, SZ],
        "ec_cuda_blast": [ctypes.c_int, P, P, P, P, P, P, P, I64, I64, I64, I64, I64, P, SZ, ctypes.c_char_p, SZ],
        "ec_cuda_lowrank_workspace_bytes": [ctypes.c_int, I64, I64, I64, I64],
        "ec_cuda_monarch_workspace_bytes": [ctypes.c_int, I64, I64, I64, I64, I64],
        "ec_cuda_blast_workspace_bytes": [ctypes.c_int, I64, I64, I64, I64, I64],
    }.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = SZ if name.endswith("_bytes") else ctypes.c_int
    return lib, session["mock"], session["build_dir"], session["manifest"]


def _storage(values: np.ndarray, dtype: int) -> np.ndarray:
    if dtype == FP32:
        return np.ascontiguousarray(values, np.float32)
    if dtype == FP16:
        return np.ascontiguousarray(values, np.float16)
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # bf16, round to nearest even


def _values(stored: np.ndarray, dtype: int) -> np.ndarray:
    """What the stored numbers are, as an array kernels/reference.py understands (fp16 stays fp16)."""
    if dtype == BF16:
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored


def _ptr(a):
    return None if a is None else a.ctypes.data


def run_op(cuda, op, dtype, dims, with_bias, seed=0, stream=FAKE_STREAM, workspace_bytes=None):
    """Launch op through its C entry point; returns (rc, message, output values, reference)."""
    lib, mock, *_ = cuda
    rng = np.random.default_rng(seed)
    mock.mock_set_dtype(dtype)

    def rand(*shape):
        return _storage(rng.standard_normal(shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1), dtype)

    if op == "LowRankMatMul":
        m, k, r, n = dims
        x, factors, n_out = rand(m, k), (rand(k, r), rand(r, n)), n
        need = lib.ec_cuda_lowrank_workspace_bytes(dtype, m, k, r, n)
    else:
        m, b, p, r, q = dims
        x, n_out = rand(m, b * p), b * q
        factors = (
            (rand(b, p, r), rand(b, r, q)) if op == "MonarchMatMul" else (rand(b, r, q), rand(b, b, r), rand(b, p, r))
        )
        sizer = lib.ec_cuda_monarch_workspace_bytes if op == "MonarchMatMul" else lib.ec_cuda_blast_workspace_bytes
        need = sizer(dtype, m, b, p, r, q)
    bias = rand(n_out) if with_bias else None
    y = np.full((m, n_out), 0x7E00 if dtype != FP32 else np.nan, np.float32 if dtype == FP32 else np.uint16)
    if dtype == FP16:
        y = y.view(np.float16)
    ws_bytes = need if workspace_bytes is None else workspace_bytes
    ws = np.empty(max(ws_bytes, 1), np.uint8)
    err = ctypes.create_string_buffer(512)
    fn = {"LowRankMatMul": lib.ec_cuda_lowrank, "MonarchMatMul": lib.ec_cuda_monarch, "BlastMatMul": lib.ec_cuda_blast}[
        op
    ]
    rc = fn(dtype, stream, _ptr(x), *map(_ptr, factors), _ptr(bias), _ptr(y), *dims, _ptr(ws), ws_bytes, err, 512)
    vals = [_values(a, dtype) for a in (x, *factors)]
    want = reference.REFERENCES[op](vals[0], *vals[1:], None if bias is None else _values(bias, dtype))
    return rc, err.value.decode(), _values(y, dtype).astype(np.float64), want.astype(np.float64)


def _launches(mock) -> list[dict]:
    rows = []
    for line in mock.mock_log().decode().splitlines():
        hit = re.match(
            r"cuLaunchKernel (\w+) grid=\((\d+),(\d+),(\d+)\) block=\((\d+),1,1\) shared=(\d+) "
            r"params=(\d+) scratch=(\w+) ptx=(\d)",
            line,
        )
        if hit:
            name, gx, gy, gz, block, shared, params, scratch, ptx = hit.groups()
            rows.append(
                {
                    "name": name,
                    "grid": (int(gx), int(gy), int(gz)),
                    "block": int(block),
                    "shared": int(shared),
                    "params": int(params),
                    "scratch": scratch,
                    "ptx": int(ptx),
                }
            )
    return rows


def _entry(manifest, kernel, dtype, sm, config):
    return next(
        e
        for e in manifest["entries"]
        if (e["kernel"], e["dtype"], e["sm"], e["config"]) == (kernel, DTYPE_NAMES[dtype], sm, config)
    )


def _fnv1a(data: bytes) -> str:
    h = 1469598103934665603
    for byte in data:
        h = ((h ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


@pytest.mark.parametrize("sm", [86, 87, 89, 90])
def test_each_sm_gets_its_cubin_grid_block_and_params(cuda, monkeypatch, sm):
    _, mock, build_dir, manifest = cuda
    monkeypatch.setenv("MOCK_SM", str(sm))
    mock.mock_reset()
    rc, msg, _, _ = run_op(cuda, "LowRankMatMul", FP16, (5, 40, 12, 300), with_bias=True)
    assert rc == 0, msg
    entry = _entry(manifest, "lowrank_fused_kernel", FP16, sm, "m16")
    cubin = (build_dir / entry["cubin_file"]).read_bytes()
    log = mock.mock_log().decode()
    abi = 8 if sm == 90 and manifest["ptxas"]["90"]["ptxas"] == "triton-bundled" else 7
    assert f"cuModuleLoadData cubin abi={abi} sm={sm} bytes={len(cubin)} fnv={_fnv1a(cubin)}" in log
    assert f"cuModuleGetFunction {entry['function']}" in log
    assert "cuCtxPushCurrent" in log and log.count("cuCtxPushCurrent") == log.count("cuCtxPopCurrent")
    (launch,) = _launches(mock)
    assert launch == {
        "name": "lowrank_fused_kernel",
        "grid": (1, 3, 1),
        "block": 32 * entry["num_warps"],
        "shared": entry["shared"],
        "params": entry["num_params"],
        "scratch": "null",
        "ptx": 0,
    }

    mock.mock_reset()
    rc, msg, _, _ = run_op(cuda, "MonarchMatMul", FP16, (70, 3, 8, 6, 65), with_bias=False)
    assert rc == 0, msg
    first, second = _launches(mock)
    assert first["name"] == "monarch_permute_kernel" and first["grid"] == (2, 1, 3) and first["params"] == 7 + 2
    assert second["name"] == "block_diag_kernel" and second["grid"] == (2, 2, 3) and second["params"] == 9 + 2


OP_CASES = [
    ("LowRankMatMul", (37, 96, 33, 80)),  # fused m16
    ("LowRankMatMul", (100, 24, 1, 9)),  # fused m64, rank 1
    ("LowRankMatMul", (300, 8, 12, 10)),  # two kernels through the workspace, rank > in
    ("LowRankMatMul", (2, 4096, 8, 2048)),  # two kernels at decode: re-reading A per N tile would cost more
    ("MonarchMatMul", (37, 4, 24, 8, 20)),
    ("MonarchMatMul", (1, 3, 5, 6, 7)),  # n = 1, ragged everything
    ("BlastMatMul", (37, 4, 24, 6, 20)),
    ("BlastMatMul", (3, 16, 4, 5, 3)),  # b = 16: the largest accumulator
]


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=DTYPE_NAMES.get)
@pytest.mark.parametrize("op,dims", OP_CASES, ids=[f"{op}-{'x'.join(map(str, d))}" for op, d in OP_CASES])
def test_output_matches_reference(cuda, monkeypatch, op, dims, dtype):
    monkeypatch.setenv("MOCK_SM", "87")
    for with_bias in (False, True):
        rc, msg, got, want = run_op(cuda, op, dtype, dims, with_bias, seed=len(dims) + dims[0])
        assert rc == 0, msg
        assert np.abs(got - want).max() <= TOLERANCE[dtype] * max(1.0, np.abs(want).max())


def test_lowrank_path_and_grids_follow_the_size(cuda, monkeypatch):
    _, mock, _, manifest = cuda
    monkeypatch.setenv("MOCK_SM", "89")
    for dims, want in [
        ((2, 4096, 8, 2048), [("gemm_kernel", (1, 1, 1)), ("gemm_kernel", (1, 64, 1))]),  # decode, two kernels
        ((100, 24, 5, 9), [("lowrank_fused_kernel", (2, 1, 1))]),  # fused m64
        ((300, 8, 12, 10), [("gemm_kernel", (3, 1, 1)), ("gemm_kernel", (3, 1, 1))]),  # large n: m128
    ]:
        mock.mock_reset()
        rc, msg, _, _ = run_op(cuda, "LowRankMatMul", FP32, dims, True)
        assert rc == 0, msg
        assert [(launch["name"], launch["grid"]) for launch in _launches(mock)] == want
    assert _entry(manifest, "gemm_kernel", FP32, 89, "m16")["num_warps"] == 4


def test_null_stream_uses_the_current_context(cuda, monkeypatch):
    monkeypatch.setenv("MOCK_SM", "89")
    rc, msg, got, want = run_op(cuda, "BlastMatMul", FP32, (4, 2, 8, 3, 5), True, stream=None)
    assert rc == 0, msg
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_empty_batch_launches_nothing(cuda, monkeypatch):
    _, mock, *_ = cuda
    monkeypatch.setenv("MOCK_SM", "87")
    for op, dims in (
        ("LowRankMatMul", (0, 8, 4, 8)),
        ("MonarchMatMul", (0, 2, 4, 4, 4)),
        ("BlastMatMul", (0, 2, 4, 4, 4)),
    ):
        mock.mock_reset()
        rc, msg, got, _ = run_op(cuda, op, FP16, dims, True)
        assert (rc, msg, got.shape[0]) == (0, "", 0)
        assert "cuLaunchKernel" not in mock.mock_log().decode()


def test_sm_without_cubins_names_it_and_the_shipped_ones(cuda, monkeypatch):
    monkeypatch.setenv("MOCK_SM", "75")
    rc, msg, _, _ = run_op(cuda, "LowRankMatMul", FP16, (2, 8, 4, 8), False)
    assert rc == 1
    assert msg == "LowRankMatMul(CUDA): no cubin for this GPU's sm_75; this library ships sm_86, sm_87, sm_89, sm_90"


def test_refused_cubin_falls_back_to_ptx(cuda, monkeypatch):
    _, mock, *_ = cuda
    monkeypatch.setenv("MOCK_SM", "86")
    monkeypatch.setenv("MOCK_REFUSE_CUBIN", "1")
    mock.mock_reset()
    rc, msg, got, want = run_op(cuda, "MonarchMatMul", FP16, (5, 2, 8, 4, 8), False)
    assert rc == 0, msg
    assert [launch["ptx"] for launch in _launches(mock)] == [1, 1]
    assert "cuModuleLoadData ptx target=sm_86" in mock.mock_log().decode()
    assert np.abs(got - want).max() <= 2e-3 * max(1.0, np.abs(want).max())
    monkeypatch.setenv("MOCK_REFUSE_PTX", "1")
    mock.mock_reset()
    rc, msg, _, _ = run_op(cuda, "MonarchMatMul", FP16, (5, 2, 8, 4, 8), False)
    assert rc == 1
    assert "refused the sm_86 cubin" in msg and "PTX fallback (CUDA_ERROR_INVALID_PTX (218))" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "op,dims,expected",
    [
        ("MonarchMatMul", (4, 3, 8, 4, 8), "R=4 channels is not a multiple of b=3"),
        ("BlastMatMul", (4, 17, 2, 2, 2), "b=17 blocks; the CUDA kernel supports at most 16"),
        ("LowRankMatMul", (4, 8, 0, 8), "K, R and N must be positive"),
        ("LowRankMatMul", (70000, 40000, 4, 8), "too large for the kernels' 32-bit indexing"),
    ],
)
def test_bad_sizes_are_one_line_errors(cuda, monkeypatch, op, dims, expected):
    lib, *_ = cuda
    monkeypatch.setenv("MOCK_SM", "87")
    err = ctypes.create_string_buffer(256)
    fn = {"LowRankMatMul": lib.ec_cuda_lowrank, "MonarchMatMul": lib.ec_cuda_monarch, "BlastMatMul": lib.ec_cuda_blast}[
        op
    ]
    dummy = np.zeros(16, np.float32)  # never read: sizes are checked first
    n_ptrs = {"LowRankMatMul": 5, "MonarchMatMul": 5, "BlastMatMul": 6}[op]  # inputs, bias, y
    rc = fn(FP32, FAKE_STREAM, *[dummy.ctypes.data] * n_ptrs, *dims, None, 0, err, 256)
    assert rc == 1 and expected in err.value.decode() and err.value.decode().startswith(op + "(CUDA): ")


def test_kernel_over_the_devices_shared_limit_is_refused(cuda, monkeypatch):
    monkeypatch.setenv("MOCK_SM", "87")
    monkeypatch.setenv("MOCK_SHARED_OPTIN", "4096")
    rc, msg, _, _ = run_op(cuda, "LowRankMatMul", FP16, (3, 8, 4, 8), False)
    assert rc == 1
    assert re.fullmatch(
        r"LowRankMatMul\(CUDA\): lowrank_fused_kernel needs \d+ B of shared memory; this sm_87 device allows 4096", msg
    )


def test_short_workspace_is_refused(cuda, monkeypatch):
    monkeypatch.setenv("MOCK_SM", "87")
    rc, msg, _, _ = run_op(cuda, "LowRankMatMul", FP16, (300, 8, 12, 10), False, workspace_bytes=100)
    assert rc == 1 and "needs 7200 bytes, the caller gave 100" in msg


@pytest.fixture(scope="module")
def no_cubins_library(tmp_path_factory):
    return launch_library(tmp_path_factory.mktemp("no_cubins"), None)


def test_library_without_cubins_says_so(cuda, no_cubins_library):
    lib = ctypes.CDLL(str(no_cubins_library))
    lib.ec_cuda_lowrank.argtypes = cuda[0].ec_cuda_lowrank.argtypes
    err = ctypes.create_string_buffer(256)
    x = np.zeros(64, np.float32)
    rc = lib.ec_cuda_lowrank(
        FP32, FAKE_STREAM, *[x.ctypes.data] * 3, None, x.ctypes.data, 2, 4, 2, 4, None, 0, err, 256
    )
    assert rc == 1 and "built without cubins (run `make kernels`" in err.value.decode()


PROBE = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
err = ctypes.create_string_buffer(512)
rc = lib.ec_cuda_probe(err, ctypes.c_size_t(512))
print(rc, err.value.decode())
"""


def test_probe_reports_a_missing_libcuda(no_cubins_library, tmp_path):
    lib_path = no_cubins_library  # the cubins do not matter to the probe
    missing = tmp_path / "no-driver" / "libcuda.so.1"
    env = {**os.environ, "EC_LIBCUDA": str(missing)}
    done = subprocess.run(
        [sys.executable, "-P", "-c", PROBE, str(lib_path)], env=env, capture_output=True, check=False, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"1 cannot dlopen {missing}: {missing}: cannot open shared object file: "
        "No such file or directory (no NVIDIA driver on this machine?)"
    )
