"""The ahead-of-time generator: cubins per SM, what the manifest and header record, build-time refusals."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from edgecompress.kernels.aot import KernelBuildError
from edgecompress.kernels.aot.generate import generate
from edgecompress.kernels.aot.ptxas import pinned_ptxas

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("cubins")
    manifest = generate(out, kernels=["lowrank_fused_kernel"], dtypes=["fp16"], sms=[86, 87, 90], log=lambda _: None)
    return out, manifest


def _elf_sm(cubin: bytes) -> tuple[int, int]:
    abi = cubin[8]
    flags = int.from_bytes(cubin[48:52], "little")
    return abi, (flags >> 8) & 0xFF if abi >= 8 else flags & 0xFF


def test_entries_match_their_sm_and_parameters(small_build):
    out, manifest = small_build
    entries = manifest["entries"]
    assert {(e["sm"], e["config"]) for e in entries} == {(sm, c) for sm in (86, 87, 90) for c in ("m16", "m64")}
    for e in entries:
        cubin = (out / e["cubin_file"]).read_bytes()
        assert cubin[:4] == b"\x7fELF"
        assert _elf_sm(cubin)[1] == e["sm"]
        assert e["num_params"] == 10 + 2  # 10 runtime arguments + Triton's 2 hidden scratch pointers
        assert [p[0] for p in e["params"]] == [
            "x_ptr",
            "a_ptr",
            "b_ptr",
            "bias_ptr",
            "y_ptr",
            "M",
            "K",
            "R",
            "N",
            "has_bias",
        ]
        ptx = (out / e["ptx_file"]).read_text()
        assert re.search(rf"^\s*\.version {re.escape(e['ptx_isa'])}$", ptx, re.MULTILINE)
        assert e["shared"] > 0 and e["num_warps"] == 4
    assert manifest["triton_version"] and manifest["kernels"]["lowrank_fused_kernel"]["params"][0] == ["x_ptr", "ptr"]


def test_jetson_sm87_uses_the_pinned_ptxas(small_build):
    _, manifest = small_build
    tools = manifest["ptxas"]
    if pinned_ptxas():
        assert tools["87"]["ptxas"] == "nvidia-cuda-nvcc-cu12" and "12.6" in tools["87"]["version"]
        isa = {e["ptx_isa"] for e in manifest["entries"] if e["sm"] == 87}
        assert isa == {"8.5"}  # Triton picks the ISA from the ptxas version
    else:
        assert tools["87"]["ptxas"] == "triton-bundled"
    assert tools["86"]["ptxas"] == "triton-bundled"
    assert all("driver" in t["expected_drivers"] for t in tools.values())


def test_header_lists_every_entry(small_build):
    out, manifest = small_build
    header = (out / "ec_cubins.h").read_text()
    assert f"#define EC_CUBIN_COUNT {len(manifest['entries'])}" in header
    assert header.count("alignas(128) static const char ec_cubin_") == len(manifest["entries"])
    assert header.count("alignas(128) static const char ec_ptx_") == len(manifest["entries"])
    assert '"lowrank_fused_kernel", 10, 87, "m16", "lowrank_fused_kernel"' in header


def test_second_run_is_incremental(small_build):
    out, manifest = small_build
    before = (out / "manifest.json").stat().st_mtime_ns
    start = time.monotonic()
    again = generate(out, kernels=["lowrank_fused_kernel"], dtypes=["fp16"], sms=[86, 87, 90], log=lambda _: None)
    assert time.monotonic() - start < 5
    assert again["inputs_sha256"] == manifest["inputs_sha256"]
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_shared_memory_over_the_sm_limit_is_refused(monkeypatch, tmp_path):
    from edgecompress.kernels.aot import compile_one

    # A small limit instead of a huge tile: the check is the same and the compile stays fast.
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DISABLE_LINE_INFO", "1")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    monkeypatch.setenv("TRITON_PTXAS_PATH", "")  # compile_entry sets it; monkeypatch then restores it
    monkeypatch.setitem(compile_one.SHARED_OPTIN_BYTES, 86, 1024)
    with pytest.raises(
        KernelBuildError, match=r"gemm_kernel\[fp16, sm_86, m128\]: shared \d+ B > sm_86's opt-in limit 1024 B"
    ):
        compile_one.compile_entry("gemm_kernel", "fp16", 86, "m128")


def test_cli_rejects_an_unknown_sm_in_one_line():
    done = subprocess.run(
        [sys.executable, "-P", "-m", "edgecompress.kernels.aot", "--sm", "75", "--out", "/nonexistent/x"],
        cwd=ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "sm_75" in done.stderr and "Traceback" not in done.stderr


def test_kernels_a_plain_launch_cannot_honour_are_refused(monkeypatch):
    """Metadata a cuLaunchKernel launcher cannot serve (scratch, clusters, PDL, TMA descriptors, a
    parameter count off the ABI): all named in one error. triton.compile is stubbed: no compile needed."""
    import types

    import triton
    from edgecompress.kernels.aot import compile_one

    def fake_compile(src, target, options):
        meta = types.SimpleNamespace(
            name="gemm_kernel",
            num_warps=4,
            shared=0,
            global_scratch_size=128,
            profile_scratch_size=0,
            num_ctas=2,
            launch_cooperative_grid=False,
            launch_pdl=True,
            tensordesc_meta=[{"swizzle": 128}],
        )
        ptx = ".version 8.5\n.visible .entry gemm_kernel(\n.param .u64 p0,\n.param .u64 p1\n)\n{}"
        return types.SimpleNamespace(metadata=meta, src=src, asm={"ptx": ptx, "cubin": b"\x7fELF"})

    monkeypatch.setenv("TRITON_PTXAS_PATH", "")
    monkeypatch.setattr(triton, "compile", fake_compile)
    with pytest.raises(KernelBuildError) as caught:
        compile_one.compile_entry("gemm_kernel", "fp16", 87, "m128")
    message = str(caught.value)
    for part in (
        "gemm_kernel[fp16, sm_87, m128]",
        "needs scratch memory (global 128",
        "num_ctas=2",
        "cooperative/PDL",
        "TMA tensor descriptors",
        "PTX has 2 .params, expected 8 + 2",
    ):
        assert part in message
    assert "\n" not in message
