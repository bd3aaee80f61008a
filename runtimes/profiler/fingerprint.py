"""What machine a profile ran on: CPU, GPU, Jetson release and power mode, and the software stack.

Everything is read, never changed (the power mode in particular). A field that cannot be read is
None. `fingerprint` is a sha1 of the stable fields, so two profiles from the same setup share it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import onnxruntime as ort

# L4T release -> JetPack (jtop's and jetson-containers' tables; docs "profiler-and-targets" §E.1).
L4T_TO_JETPACK = {"36.3": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1", "36.4.7": "6.2.1",
                  "36.5.0": "6.2.2", "39.2": "7.2"}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def _command(*args: str, timeout: float = 5) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def host() -> dict:
    cpu = platform.processor() or platform.machine()
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith(("model name", "Model")):
            cpu = line.split(":", 1)[1].strip()
            break
    ram_kb = re.search(r"MemTotal:\s+(\d+)", _read("/proc/meminfo") or "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "logical_cpus": os.cpu_count(),
        "ram_gb": round(int(ram_kb.group(1)) / 2**20, 1) if ram_kb else None,
        "os": platform.platform(),
        "kernel": platform.release(),
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
    }


def parse_l4t(text: str | None) -> str | None:
    """'# R36 (release), REVISION: 4.3, GCID: ...' -> '36.4.3'."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text or "")
    return f"{match.group(1)}.{match.group(2)}" if match else None


def parse_nvpmodel(text: str | None) -> dict | None:
    """`nvpmodel -q` -> {"name": "MAXN_SUPER", "id": 2}."""
    match = re.search(r"NV Power Mode:\s*(\S+)\s*\n\s*(\d+)", text or "")
    if match:
        return {"name": match.group(1), "id": int(match.group(2))}
    match = re.search(r"NV Power Mode:\s*(\S+)", text or "")
    return {"name": match.group(1), "id": None} if match else None


def jetson() -> dict | None:
    release = _read("/etc/nv_tegra_release")
    if release is None:
        return None
    l4t = parse_l4t(release)
    jetpack = L4T_TO_JETPACK.get(l4t or "") or L4T_TO_JETPACK.get(".".join((l4t or "").split(".")[:2]))
    return {
        "l4t": l4t,
        "jetpack": jetpack,
        "module": _read("/proc/device-tree/model"),
        "nvpmodel": parse_nvpmodel(_command("nvpmodel", "-q")),
        "emc_max_mhz": _emc_max_mhz(),
    }


def _emc_max_mhz() -> float | None:
    rate = _read("/sys/kernel/debug/bpmp/debug/clk/emc/max_rate")  # Hz; root only
    return round(int(rate) / 1e6, 1) if rate and rate.isdigit() else None


def gpu() -> dict | None:
    try:
        import pynvml  # optional: nvidia-ml-py

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return {
            "name": name.decode() if isinstance(name, bytes) else name,
            "sm": major * 10 + minor,
            "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
            "cuda": f"{cuda // 1000}.{cuda % 1000 // 10}",
            "mem_gb": round(pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30, 1),
            "clocks_mhz": {"gpu_max": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
                           "mem_max": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)},
            "source": "nvml",
        }
    except Exception:  # no pynvml, no driver, no GPU
        pass
    out = _command("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits")
    if out and out.strip():
        name, driver, memory = [part.strip() for part in out.splitlines()[0].split(",")[:3]]
        return {"name": name, "driver": driver, "mem_gb": _gb(memory), "source": "nvidia-smi"}
    return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _gb(mib: str) -> float | None:
    try:
        return round(float(mib) / 1024, 1)
    except ValueError:
        return None


def software() -> dict:
    from edgecompress.runtimes.onnxruntime_install import describe as onnxruntime_distributions

    version = None
    for name in ("edgecompress", "edgecompress-runtime"):  # the compiler, or the runtime-only install
        try:
            version = version or metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    build_info = getattr(ort, "get_build_info", lambda: None)()
    return {
        "onnxruntime": ort.__version__,
        "onnxruntime_distribution": onnxruntime_distributions(),  # onnxruntime, onnxruntime-gpu, a Jetson wheel
        "build_info": build_info,
        "providers": ort.get_available_providers(),
        "edgecompress": version,
        "python": platform.python_version(),
        "numpy": sys.modules["numpy"].__version__ if "numpy" in sys.modules else None,
    }


def describe() -> dict:
    device = {"host": host(), "gpu": gpu(), "jetson": jetson(), "software": software()}
    stable = {
        "host": {k: device["host"][k] for k in ("cpu", "cores", "ram_gb", "os")},
        "gpu": device["gpu"], "jetson": device["jetson"],
        "software": {k: device["software"][k] for k in ("onnxruntime", "providers", "edgecompress")},
    }
    device["fingerprint"] = hashlib.sha1(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()
    return device


def power_mode_warning(device: dict, expected: str | None) -> str | None:
    """A warning when the Jetson's nvpmodel mode is not the one the target's numbers assume."""
    mode = ((device.get("jetson") or {}).get("nvpmodel") or {}).get("name")
    if expected and mode and mode != expected:
        return (f"power mode {mode} differs from the target's expected {expected} "
                f"(not changed; `sudo nvpmodel` sets it)")
    return None
