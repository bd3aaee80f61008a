"""Memory during a profile, every number labelled with where it came from.

- Host: the kernel's peak RSS (`VmHWM`), reset per phase through /proc/self/clear_refs ("5" resets the
  peak to the current RSS), so load, prefill and decode each get their own exact peak with no sampling.
  Where clear_refs is not writable, `ru_maxrss` (the process's lifetime peak) is reported instead.
- Discrete GPUs: NVML (`pynvml` from nvidia-ml-py, optional), device-used and this process's use,
  sampled every `sample_ms` on a thread. Only started when NVML is importable and initialises.
- Jetson: CUDA memory comes from NvMap and is not in RSS, so `tegrastats` (when on PATH) is read for
  system RAM in use, the EMC clock (live bandwidth) and power rails; raw lines are kept.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import threading
import time
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(key: str) -> float | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


class HostMemory:
    """Peak RSS per phase: `reset()` before a phase, `peak_mb()` after it."""

    def __init__(self):
        self.source = "vmhwm" if self._can_reset() else "ru_maxrss"

    @staticmethod
    def _can_reset() -> bool:
        if _status_mb("VmHWM") is None:
            return False
        try:
            CLEAR_REFS.write_text("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.source == "vmhwm":
            CLEAR_REFS.write_text("5")

    def peak_mb(self) -> float:
        if self.source == "vmhwm":
            return _status_mb("VmHWM") or 0.0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    @staticmethod
    def current_mb() -> float | None:
        return _status_mb("VmRSS")


class Sampler:
    """A background reader of (time_ns, values) samples; `window_stats` gives the max and mean of each key over
    [start, end] windows (the timed runs of one test)."""

    def __init__(self):
        self.samples: list[tuple[int, dict]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def window_stats(self, windows: list[tuple[int, int]]) -> dict[str, dict[str, float]]:
        """{key: {"max", "mean"}} over the samples inside any of `windows`."""
        seen: dict[str, list[float]] = {}
        for t, values in self.samples:
            if any(start <= t <= end for start, end in windows):
                for key, value in values.items():
                    if isinstance(value, (int, float)):
                        seen.setdefault(key, []).append(float(value))
        return {key: {"max": max(v), "mean": sum(v) / len(v)} for key, v in seen.items()}


class NvmlSampler(Sampler):
    """Device-wide used memory and this process's use on GPU 0 (pid join fails in containers: then
    device used minus the baseline taken before the session, labelled `nvml_device_delta`)."""

    def __init__(self, pynvml, sample_ms: float):
        super().__init__()
        self.nvml, self.interval = pynvml, sample_ms / 1000
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.baseline_mb = self._device_used_mb()
        self.process_seen = False

    @classmethod
    def create(cls, sample_ms: float):
        try:
            import pynvml  # optional: nvidia-ml-py

            pynvml.nvmlInit()
            return cls(pynvml, sample_ms)
        except Exception:  # not installed, no driver, no GPU: no NVML numbers
            return None

    def _device_used_mb(self) -> float:
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20

    def _process_mb(self) -> float | None:
        try:
            for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    return proc.usedGpuMemory / 2**20
        except Exception:
            pass
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            values = {"gpu_device_used_mb": self._device_used_mb()}
            process = self._process_mb()
            if process is not None:
                values["gpu_process_mb"] = process
                self.process_seen = True
            values["gpu_device_delta_mb"] = values["gpu_device_used_mb"] - self.baseline_mb
            self.samples.append((time.perf_counter_ns(), values))
            self._stop.wait(self.interval)

    def source(self) -> str:
        return "nvml_process" if self.process_seen else "nvml_device_delta"


TEGRA_RAM = re.compile(r"RAM (\d+)/(\d+)MB")
TEGRA_EMC = re.compile(r"EMC_FREQ (\d+)%(?:@(\d+))?")
TEGRA_GR3D = re.compile(r"GR3D_FREQ (\d+)%(?:@\[?([\d,]+)\]?)?")
TEGRA_RAIL = re.compile(r"\b(V[A-Z0-9_]+) (\d+)mW/(\d+)mW")


def parse_tegrastats(line: str) -> dict:
    """One tegrastats line -> numbers; each field optional (formats drift between L4T releases)."""
    values: dict = {}
    if match := TEGRA_RAM.search(line):
        values["ram_used_mb"], values["ram_total_mb"] = int(match.group(1)), int(match.group(2))
    if match := TEGRA_EMC.search(line):
        values["emc_util_pct"] = int(match.group(1))
        if match.group(2):
            values["emc_mhz"] = int(match.group(2))
    if match := TEGRA_GR3D.search(line):
        values["gpu_util_pct"] = int(match.group(1))
        if match.group(2):
            values["gpu_mhz"] = max(int(mhz) for mhz in match.group(2).split(",") if mhz)
    for name, current, _average in TEGRA_RAIL.findall(line):
        values[f"power_{name}_mw"] = int(current)
    return values


class TegrastatsSampler(Sampler):
    """`tegrastats --interval N` in a subprocess, stopped by its pid; raw lines kept for the trace folder."""

    def __init__(self, sample_ms: float):
        super().__init__()
        self.raw: list[str] = []
        self.process = subprocess.Popen(
            ["tegrastats", "--interval", str(max(int(sample_ms), 10))],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )

    @classmethod
    def create(cls, sample_ms: float):
        if shutil.which("tegrastats") is None:
            return None
        try:
            return cls(sample_ms)
        except OSError:
            return None

    def _run(self) -> None:
        for line in self.process.stdout:
            if self._stop.is_set():
                break
            self.raw.append(line.rstrip("\n"))
            self.samples.append((time.perf_counter_ns(), parse_tegrastats(line)))

    def stop(self) -> None:
        self._stop.set()
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def latest(self, key: str):
        for _, values in reversed(self.samples):
            if key in values:
                return values[key]
        return None


def nvmap_process_mb() -> float | None:
    """This process's NvMap allocations (Jetson; the debugfs file needs root), else None."""
    try:
        lines = Path("/sys/kernel/debug/nvmap/iovmm/clients").read_text().splitlines()
    except OSError:
        return None
    total = 0.0
    for line in lines:
        parts = line.split()
        if len(parts) >= 4 and parts[2] == str(os.getpid()):
            total += _size_mb(parts[3])
    return total


def _size_mb(text: str) -> float:
    match = re.match(r"(\d+)([KMG]?)", text)
    if not match:
        return 0.0
    scale = {"": 1 / 2**20, "K": 1 / 1024, "M": 1.0, "G": 1024.0}[match.group(2)]
    return int(match.group(1)) * scale
