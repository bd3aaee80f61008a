"""Builds for the launch-path tests: the cubins (kernels/build, reused when up to date, as `make kernels`
leaves it), cuda_launch.cc + c_api.cc as a test .so against their header, and the mock libcuda."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "kernels" / "csrc"
CXXFLAGS = ["-std=c++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror"]


def cubins() -> tuple[Path, dict]:
    from edgecompress.kernels.aot.generate import DEFAULT_OUT, generate

    return DEFAULT_OUT, generate(DEFAULT_OUT, log=lambda _: None)


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, check=False, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def launch_library(out: Path, include_dir: Path | None) -> Path:
    """cuda_launch.cc + c_api.cc as the library engineer's build compiles them (no onnxruntime headers)."""
    lib = out / ("libec_launch.so" if include_dir else "libec_launch_nocubins.so")
    include = [f"-I{include_dir}"] if include_dir else []
    _run(
        [
            "g++",
            *CXXFLAGS,
            *include,
            str(CSRC / "cuda_launch.cc"),
            str(CSRC / "c_api.cc"),
            "-o",
            str(lib),
            "-Wl,--no-undefined",
        ]
    )
    return lib


def mock_libcuda(out: Path) -> Path:
    lib = out / "libcuda.so.1"
    _run(
        [
            "gcc",
            "-O2",
            "-shared",
            "-fPIC",
            "-Wall",
            "-Werror",
            str(Path(__file__).with_name("mock_libcuda.c")),
            "-o",
            str(lib),
            "-lm",
        ]
    )
    return lib


_SESSION = {}


def mock_session() -> dict:
    """One build per test process: {'lib', 'mock' (ctypes CDLLs), 'lib_path', 'build_dir', 'manifest'}.

    The library reads EC_LIBCUDA once, at its first driver use: it is set for that first probe only, so it
    does not leak into other tests. The mock's CDLL is the object the library dlopens (same path)."""
    import ctypes
    import os
    import tempfile

    if not _SESSION:
        build_dir, manifest = cubins()
        tmp = tempfile.TemporaryDirectory(prefix="ec_cuda_launch_")
        out = Path(tmp.name)
        mock_path = mock_libcuda(out)
        lib_path = launch_library(out, build_dir)
        lib = ctypes.CDLL(str(lib_path))
        lib.ec_cuda_probe.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        saved = os.environ.get("EC_LIBCUDA")
        os.environ["EC_LIBCUDA"] = str(mock_path)
        try:
            err = ctypes.create_string_buffer(512)
            assert lib.ec_cuda_probe(err, 512) == 0, err.value
        finally:
            if saved is None:
                os.environ.pop("EC_LIBCUDA")
            else:
                os.environ["EC_LIBCUDA"] = saved
        mock = ctypes.CDLL(str(mock_path))
        mock.mock_log.restype = ctypes.c_char_p
        _SESSION.update(lib=lib, mock=mock, lib_path=lib_path, build_dir=build_dir, manifest=manifest, tmp=tmp)
    return _SESSION
