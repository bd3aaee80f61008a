"""The custom-op library libedgecompress_ops.so: find it, build it, check it, register it.

`library_path()` finds the built library (EDGECOMPRESS_OPS_LIBRARY first, then kernels/build/);
`build_library()` compiles kernels/csrc/*.cc with g++ (cubins from kernels/build/ec_cubins.h when the
generator made them, else a CPU-only library); `register(session_options)` loads it into onnxruntime;
`manifest()` is the library's own description plus the cubin manifest.json. Torch-free: the runtime uses
this module. `python -m edgecompress.kernels [--build] [--force]` is what `make kernels` runs.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edgecompress.errors import EdgeCompressError, first_line

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
BUILD = HERE / "build"
LIBRARY_NAME = "libedgecompress_ops.so"
ENV_LIBRARY = "EDGECOMPRESS_OPS_LIBRARY"
ENV_HEADERS_CACHE = "EDGECOMPRESS_ORT_HEADERS_CACHE"
HEADERS_SCRIPT = HERE / "fetch_ort_headers.sh"
FIX = "run `make kernels` (or `python -m edgecompress.kernels --build`)"
CXXFLAGS = [
    "-std=c++17",
    "-O3",
    "-shared",
    "-fPIC",
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
    "-Wall",
    "-Wextra",
]
LDFLAGS = ["-Wl,--no-undefined"]  # an unresolved symbol (e.g. OrtGetApiBase) fails the build, not the load


class KernelLibraryError(EdgeCompressError):
    """The custom-op library is missing, unloadable, stale, or cannot be built."""


def expected_version() -> int:
    """EC_LIBRARY_VERSION from csrc/library_info.h: the one place the version is written."""
    match = re.search(r"#define EC_LIBRARY_VERSION (\d+)", (CSRC / "library_info.h").read_text())
    return int(match.group(1))


def library_path() -> Path:
    """The library to load: $EDGECOMPRESS_OPS_LIBRARY, else kernels/build/libedgecompress_ops.so."""
    override = os.environ.get(ENV_LIBRARY)
    if override:
        path = Path(override).expanduser().resolve()
        if not path.is_file():
            raise KernelLibraryError(f"{ENV_LIBRARY}={override} is not a file; unset it or {FIX}")
        return path
    path = BUILD / LIBRARY_NAME
    if not path.is_file():
        raise KernelLibraryError(f"no custom-op library at {path}; {FIX}")
    return path


def library_info(path: Path | None = None) -> dict:
    """What the library says about itself (ec_library_info()), checked against this package."""
    path = Path(path) if path else library_path()
    try:
        lib = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
        entry = lib.ec_library_info
    except OSError as exc:
        raise KernelLibraryError(f"cannot load the custom-op library {path}: {first_line(exc)}; {FIX}") from None
    except AttributeError:
        raise KernelLibraryError(f"{path} is not an edgecompress ops library (no ec_library_info); {FIX}") from None
    entry.restype = ctypes.c_char_p
    info = json.loads(entry().decode())
    if info.get("version") != expected_version():
        raise KernelLibraryError(
            f"the custom-op library {path} is version {info.get('version')}, this edgecompress needs version "
            f"{expected_version()}; {FIX}"
        )
    _check_runtime(path, info)
    return info


def _check_runtime(path: Path, info: dict) -> None:
    """onnxruntime must serve the C API version the library was built against (1.21 headers: >= 1.21)."""
    import onnxruntime

    runtime = tuple(int(part) for part in re.findall(r"\d+", onnxruntime.__version__)[:2])
    needed = (1, int(info["ort_api_version"]))
    if runtime < needed:
        raise KernelLibraryError(
            f"the custom-op library {path} needs onnxruntime >= {needed[0]}.{needed[1]} (C API "
            f"{info['ort_api_version']}); this onnxruntime is {onnxruntime.__version__}"
        )


def register(session_options, path: Path | None = None) -> Path:
    """Register the library's ops into an onnxruntime.SessionOptions; returns the library's path."""
    path = Path(path) if path else library_path()
    library_info(path)
    try:
        session_options.register_custom_ops_library(str(path))
    except Exception as exc:  # onnxruntime's own failure (e.g. its API version check): one line
        raise KernelLibraryError(f"onnxruntime refused the custom-op library {path}: {first_line(exc)}") from None
    return path


def manifest(path: Path | None = None) -> dict:
    """The library's description and, when present next to it, the cubin generator's manifest.json."""
    path = Path(path) if path else library_path()
    cubins_file = path.parent / "manifest.json"
    cubins = None
    if cubins_file.is_file():
        try:
            cubins = json.loads(cubins_file.read_text())
        except (OSError, ValueError) as exc:
            raise KernelLibraryError(f"unreadable cubin manifest {cubins_file}: {first_line(exc)}; {FIX}") from None
    return {"path": str(path), "library": library_info(path), "cubins": cubins}


# ---------------------------------------------------------------------------------------------- build


def ort_headers() -> Path:
    """The onnxruntime C/C++ include folder (Debian's libonnxruntime-dev 1.21, fetched once into a cache)."""
    cache = os.environ.get(ENV_HEADERS_CACHE)
    if not cache:  # a source checkout keeps it in its ignored .cache/; an installed package in ~/.cache
        top = HERE.parent
        cache = (
            top / ".cache" / "ort" if (top / "pyproject.toml").is_file() else Path.home() / ".cache/edgecompress/ort"
        )
    result = subprocess.run(
        ["bash", str(HEADERS_SCRIPT)],
        env={**os.environ, "ORT_HEADERS_CACHE": str(cache)},
        capture_output=True,
        text=True,
    )
    include = Path(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None
    if result.returncode or not include or not (include / "onnxruntime_c_api.h").is_file():
        raise KernelLibraryError(
            f"cannot fetch the onnxruntime headers ({HEADERS_SCRIPT.name}): "
            f"{first_line(Exception(result.stderr or 'no output'))}"
        )
    return include


def _build_info_header(out: Path) -> str:
    """ec_build_info.h: the cubins compiled in, summarised from manifest.json (null: a CPU-only build)."""
    cubins = "null"
    if (out / "ec_cubins.h").is_file() and (out / "manifest.json").is_file():
        data = json.loads((out / "manifest.json").read_text())
        entries = data.get("entries", [])
        summary = {
            "count": len(entries),
            "sms": sorted({e["sm"] for e in entries}),
            "dtypes": sorted({e["dtype"] for e in entries}),
            "inputs_sha256": data.get("inputs_sha256"),
        }
        cubins = json.dumps(summary)
    literal = json.dumps(cubins)  # a C string literal (JSON string escaping is valid C here)
    return f"// Generated by kernels/library.py: do not edit.\n#pragma once\n#define EC_BUILD_CUBINS_JSON {literal}\n"


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users (and from a wheel they build)
    os.replace(tmp, path)


def build_library(out: Path = BUILD, sources: list[Path] | None = None, force: bool = False, log=None) -> Path:
    """Compile the library into out/ (reused when its inputs have not changed); returns its path.

    `sources` defaults to every kernels/csrc/*.cc. Without out/ec_cubins.h the library is CPU-only
    (EC_NO_CUBINS: the CUDA kernels report that it was built without cubins). Parallel-safe: one build
    per folder at a time (flock), the library written to a temporary file and renamed."""
    log = log or (lambda message: print(message, file=sys.stderr))
    out = Path(out).resolve()  # absolute: the same folder gives the same command, hence the same key
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(Path(s).resolve() for s in (sources if sources is not None else CSRC.glob("*.cc")))
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if not compiler:
        raise KernelLibraryError("no C++ compiler (g++) on PATH: install g++ (Debian: apt-get install g++)")
    include = ort_headers()
    with open(out / f".{LIBRARY_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cubins = (out / "ec_cubins.h").is_file()
        info_header = _build_info_header(out).encode()
        if not (out / "ec_build_info.h").is_file() or (out / "ec_build_info.h").read_bytes() != info_header:
            _write_atomic(out / "ec_build_info.h", info_header)
        flags = [f"-I{CSRC}", f"-I{out}", f"-I{include}", *([] if cubins else ["-DEC_NO_CUBINS"])]
        command = [compiler, *CXXFLAGS, *flags]
        key = _inputs_key(command, sources, out, cubins)
        target, stamp = out / LIBRARY_NAME, out / f".{LIBRARY_NAME}.inputs"
        if not force and target.is_file() and stamp.is_file() and stamp.read_text() == key:
            return target
        _compile([*command, *map(str, sources)], target)
        _write_atomic(stamp, key.encode())
    log(f"kernels: built {target} ({'with' if cubins else 'without'} cubins)")
    return target


def _compile(command: list[str], target: Path) -> None:
    """Run g++ into a temporary file beside `target`, then rename it over `target` (never half-written)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        result = subprocess.run([*command, "-o", tmp, *LDFLAGS], capture_output=True, text=True)
        if result.returncode:
            lines = result.stderr.splitlines()
            causes = [line for line in lines if re.search(r"error:|undefined reference|multiple definition", line)]
            first = next((line for line in causes if not line.startswith("collect2")), lines[0] if lines else "")
            raise KernelLibraryError(f"building {target.name} failed: {first.strip() or 'g++ failed'}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _inputs_key(command: list[str], sources: list[Path], out: Path, cubins: bool) -> str:
    digest = hashlib.sha256(json.dumps(command).encode())
    headers = sorted(CSRC.glob("*.h")) + [out / "ec_build_info.h"] + ([out / "ec_cubins.h"] if cubins else [])
    for path in [*sources, *headers]:
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m edgecompress.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="build (or reuse) kernels/build/libedgecompress_ops.so")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--out", type=Path, default=BUILD, help=f"output folder (default {BUILD})")
    args = parser.parse_args(argv)
    try:
        path = build_library(args.out, force=args.force) if args.build else library_path()
        print(json.dumps(manifest(path)["library"]))
    except EdgeCompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
