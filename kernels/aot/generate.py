"""Compile every (kernel, dtype, sm, config) of configs.py in a process pool and write the outputs.

Incremental: the inputs (kernel sources, this package, Triton version, ptxas versions, the requested
set) hash to one key; when manifest.json already records it and every file is there, nothing is rebuilt.
Parallel-safe: one generation per folder at a time (flock), files replaced atomically, manifest last.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path

from . import KernelBuildError
from .header import write_header
from .ptxas import ptxas_for, ptxas_version

HERE = Path(__file__).resolve().parent
KERNEL_SOURCES = HERE.parent / "triton"
DEFAULT_OUT = HERE.parent / "build"
TRITON_ENV = {"TRITON_DEFAULT_FP_FUSION": "1", "TRITON_DISABLE_LINE_INFO": "1", "TRITON_INTERPRET": "0"}

# What each ELF/ptxas combination needs from the driver (recipe doc §2; not checked on hardware).
DRIVER_NOTES = {
    "nvidia-cuda-nvcc-cu12": "ptxas 12.6: ELF ABI 7, toolkit 12.6, PTX ISA 8.5. Loads on CUDA >= 12.6 drivers "
    "(JetPack 6.1/6.2 on Orin; desktop 12.x by minor-version compatibility, >= 525) "
    "and on CUDA 13 drivers (>= 580). JetPack 6.0 (CUDA 12.2) may refuse the PTX fallback.",
    "triton-bundled-12": "ptxas 12.9: ELF ABI 7. Desktop drivers >= 525 (CUDA 12.x minor-version compatibility) "
    "and CUDA 13 drivers; the PTX 8.8 fallback needs a 12.9+ driver to JIT.",
    "triton-bundled-13": "ptxas 13.x: ELF ABI 8. Needs a CUDA 13 driver (>= 580); 12.x drivers refuse it.",
}


def _entries(kernels, dtypes, sms):
    from edgecompress.kernels.triton import configs

    for name in kernels:
        for config in configs.KERNELS[name].configs:
            for dtype in dtypes:
                for sm in sms:
                    yield name, dtype, sm, config


def _inputs_key(request: dict, tools: dict) -> str:
    import triton

    digest = hashlib.sha256(json.dumps([request, tools, triton.__version__, TRITON_ENV]).encode())
    for folder in (KERNEL_SOURCES, HERE):
        for path in sorted(folder.glob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _up_to_date(out: Path, key: str) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    files = [out / "ec_cubins.h"] + [
        out / e[f] for e in manifest.get("entries", []) for f in ("cubin_file", "ptx_file")
    ]
    return manifest.get("inputs_sha256") == key and all(p.is_file() for p in files)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _driver_note(origin: str, version: str) -> str:
    if origin == "nvidia-cuda-nvcc-cu12":
        return DRIVER_NOTES[origin]
    return DRIVER_NOTES["triton-bundled-13" if "release 13" in version else "triton-bundled-12"]


def generate(
    out: Path = DEFAULT_OUT, kernels=None, dtypes=None, sms=None, jobs: int = 2, force: bool = False, log=print
) -> dict:
    """Build (or reuse) the cubins for the requested set; returns the manifest."""
    from edgecompress.kernels.triton import configs

    kernels = list(kernels or configs.KERNELS)
    dtypes = list(dtypes or configs.DTYPES)
    sms = [int(s) for s in (sms or configs.SMS)]
    unknown = [k for k in kernels if k not in configs.KERNELS] + [d for d in dtypes if d not in configs.DTYPES]
    unknown += [f"sm_{s}" for s in sms if s not in configs.SMS]
    if unknown:
        raise KernelBuildError(
            f"unknown kernel/dtype/sm {', '.join(map(str, unknown))}; known: "
            f"{', '.join(configs.KERNELS)}; {', '.join(configs.DTYPES)}; sm {configs.SMS}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tools = {}
    for sm in sms:
        path, origin = ptxas_for(sm)
        version = ptxas_version(path)
        tools[str(sm)] = {
            "ptxas": origin,
            "path_name": Path(path).name,
            "version": version,
            "expected_drivers": _driver_note(origin, version),
        }
    request = {"kernels": kernels, "dtypes": dtypes, "sms": sms}
    key = _inputs_key(request, {sm: t["version"] for sm, t in tools.items()})
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and _up_to_date(out, key):
            log(f"kernels: {out} is up to date")
            return json.loads((out / "manifest.json").read_text())
        return _build(out, list(_entries(kernels, dtypes, sms)), request, tools, key, jobs, log)


def _build(out, todo, request, tools, key, jobs, log) -> dict:
    import triton

    from .compile_one import compile_entry

    env = {**TRITON_ENV, "TRITON_CACHE_DIR": str(triton_cache_dir())}
    start = time.monotonic()
    context = multiprocessing.get_context("spawn")  # fresh workers: triton is imported with the pinned env
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=max(1, jobs), mp_context=context, initializer=_pin_env, initargs=(env,)
    ) as pool:
        futures = [pool.submit(compile_entry, *entry) for entry in todo]
        try:
            results = [f.result() for f in futures]
        except KernelBuildError:
            for f in futures:
                f.cancel()
            raise
        except Exception as exc:  # a Triton/ptxas failure: one line, naming what failed
            raise KernelBuildError(
                f"kernel compilation failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
            ) from exc
    entries = []
    for r in results:
        stem = f"{r['kernel']}.{r['dtype']}.sm{r['sm']}.{r['config']}"
        _write_atomic(out / f"{stem}.cubin", r["cubin"])
        _write_atomic(out / f"{stem}.ptx", r["ptx"].encode())
        entries.append(r)
    header_tmp = out / f".ec_cubins.h.{os.getpid()}.tmp"
    write_header(header_tmp, entries)
    os.replace(header_tmp, out / "ec_cubins.h")
    manifest = {
        "generator": "edgecompress.kernels.aot",
        "triton_version": triton.__version__,
        "triton_env": TRITON_ENV,
        "inputs_sha256": key,
        "request": request,
        "ptxas": tools,
        "seconds": round(time.monotonic() - start, 1),
        "kernels": _kernel_params(request["kernels"]),
        "entries": [
            {k: v for k, v in r.items() if k not in ("cubin", "ptx")}
            | {
                "cubin_file": f"{r['kernel']}.{r['dtype']}.sm{r['sm']}.{r['config']}.cubin",
                "ptx_file": f"{r['kernel']}.{r['dtype']}.sm{r['sm']}.{r['config']}.ptx",
                "cubin_bytes": len(r["cubin"]),
                "cubin_sha256": hashlib.sha256(r["cubin"]).hexdigest(),
            }
            for r in entries
        ],
    }
    _write_atomic(out / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    _prune_triton_cache(triton_cache_dir(), {r["triton_cache_key"] for r in entries})
    log(f"kernels: {len(entries)} cubins for sm {request['sms']} in {manifest['seconds']} s -> {out}")
    return manifest


def triton_cache_dir() -> Path:
    """Triton's compile cache for the generator: outside the output folder, which ships in the wheel
    and is carried to GPU machines ($EDGECOMPRESS_TRITON_CACHE overrides)."""
    default = Path.home() / ".cache" / "edgecompress" / "triton-aot"
    return Path(os.environ.get("EDGECOMPRESS_TRITON_CACHE") or default)


def _prune_triton_cache(cache: Path, keys: set[str]) -> None:
    """Keep only this build's entries: the cache would otherwise grow with every edit of a kernel."""
    import shutil

    from triton.runtime.cache import _base32

    keep = {_base32(key) for key in keys}
    for folder in cache.iterdir() if cache.is_dir() else ():
        if folder.is_dir() and folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)


def _pin_env(env: dict) -> None:
    os.environ.update(env)


def _kernel_params(kernels) -> dict:
    from edgecompress.kernels.triton import configs

    return {
        name: {
            "params": [list(p) for p in configs.KERNELS[name].params],
            "hidden_params": ["global_scratch (null)", "profile_scratch (null)"],
            "tiles": list(configs.KERNELS[name].tiles),
            "configs": configs.KERNELS[name].configs,
        }
        for name in kernels
    }
