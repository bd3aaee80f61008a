"""What every build report and benchmark records about the machine and the process."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    """This process's own peak resident memory. VmHWM starts afresh at exec; ru_maxrss would keep the
    peak of the parent that started this process (a benchmark, a test runner) when that was larger."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def machine_description() -> dict[str, Any]:
    """CPU model, cores, memory, platform and library versions, and the load average right now."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for module in ("torch", "onnxruntime", "onnx", "onnx_ir", "transformers"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            continue
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **versions,
        "load_average_at_start": os.getloadavg(),
    }
