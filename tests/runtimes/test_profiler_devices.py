"""The GPU and Jetson paths of the profiler without the hardware: a stand-in `tegrastats` on PATH, a
stand-in `pynvml` module, and a pretend Jetson release, so the parsing, the sampling windows, the live
EMC bandwidth and the power-mode warning run for real (the devices' own numbers stay unverified)."""

from __future__ import annotations

import sys
import time
import types

import pytest

from edgecompress.targets import profiles
from edgecompress.runtimes.profiler import ProfileSettings, fingerprint, memory, profile_artifact

LINE = ("RAM 2100/7620MB (lfb 157x4MB) SWAP 0/3810MB CPU [10%@1497] EMC_FREQ 40%@2133 GR3D_FREQ 60%@[612] "
        "VDD_IN 7000mW/6500mW VDD_CPU_GPU_CV 2000mW/1900mW VDD_SOC 2500mW/2400mW")


@pytest.fixture
def fake_tegrastats(tmp_path, monkeypatch):
    script = tmp_path / "bin" / "tegrastats"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\nwhile true; do echo '{LINE}'; sleep 0.02; done\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}:{__import__('os').environ['PATH']}")
    return script


def test_tegrastats_is_sampled_and_stopped_by_its_pid(fake_tegrastats):
    sampler = memory.TegrastatsSampler.create(20)
    sampler.start()
    start = time.perf_counter_ns()
    time.sleep(0.3)
    sampler.stop()
    assert sampler.process.poll() is not None and sampler.raw and sampler.raw[0] == LINE
    stats = sampler.window_stats([(start, time.perf_counter_ns())])
    assert stats["ram_used_mb"]["max"] == 2100 and stats["power_VDD_IN_mw"]["mean"] == 7000
    assert sampler.latest("emc_mhz") == 2133


def _fake_pynvml(used_mb: float, process_mb: float | None):
    module = types.SimpleNamespace(NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2)
    module.nvmlInit = lambda: None
    module.nvmlDeviceGetHandleByIndex = lambda index: "gpu0"
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=used_mb * 2**20, total=24 * 2**30)
    pid = __import__("os").getpid()
    module.nvmlDeviceGetComputeRunningProcesses = lambda h: (
        [types.SimpleNamespace(pid=pid, usedGpuMemory=process_mb * 2**20)] if process_mb else [])
    module.nvmlDeviceGetName = lambda h: b"NVIDIA L4"
    module.nvmlSystemGetCudaDriverVersion = lambda: 12060
    module.nvmlDeviceGetCudaComputeCapability = lambda h: (8, 9)
    module.nvmlSystemGetDriverVersion = lambda: "560.35"
    module.nvmlDeviceGetMaxClockInfo = lambda h, kind: 2040 if kind == 1 else 6251
    return module


@pytest.mark.parametrize("process_mb, source", [(300.0, "nvml_process"), (None, "nvml_device_delta")])
def test_nvml_samples_process_or_device_memory(monkeypatch, process_mb, source):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(1000.0, process_mb))
    sampler = memory.NvmlSampler.create(5)
    sampler.start()
    start = time.perf_counter_ns()
    time.sleep(0.05)
    sampler.stop()
    stats = sampler.window_stats([(start, time.perf_counter_ns())])
    assert stats["gpu_device_used_mb"]["max"] == pytest.approx(1000.0) and sampler.source() == source
    assert ("gpu_process_mb" in stats) == (process_mb is not None)
    gpu = fingerprint.gpu()
    assert gpu == {"name": "NVIDIA L4", "sm": 89, "driver": "560.35", "cuda": "12.6", "mem_gb": 24.0,
                   "clocks_mhz": {"gpu_max": 2040, "mem_max": 6251}, "source": "nvml"}


def test_a_jetson_run_takes_live_bandwidth_and_warns_on_the_power_mode(tiny_llama_artifact, fake_tegrastats,
                                                                         monkeypatch, tmp_path):
    target = profiles.load_profile("jetson-orin-nano")
    assert target.expected_power_mode == "15W"  # the pretend device below runs 7W: a mismatch
    pretend = {"l4t": "36.4.3", "jetpack": "6.2", "module": "NVIDIA Jetson Orin Nano", "emc_max_mhz": None,
               "nvpmodel": {"name": "7W", "id": 1}}
    monkeypatch.setattr(fingerprint, "jetson", lambda: pretend)
    settings = ProfileSettings(n_prompt=[4], n_gen=[2], repetitions=2, ops=False, threads=1, target="jetson-orin")
    result = profile_artifact(tiny_llama_artifact[0], settings, out=tmp_path / "out")
    roof = result["roofline"]
    assert roof["bw_source"] == "emc_live" and roof["bw_gbs"] == round(2133 * 2 * target.emc_bus_bits / 8 / 1000, 1)
    assert not roof["measured_on_target"] and "prediction" in roof["label"]  # measured on the CPU, not the Orin
    assert any("power mode 7W differs" in w for w in result["warnings"])
    sources = result["tests"][0]["memory"]["source"]
    assert sources[0] in ("vmhwm", "ru_maxrss") and "tegrastats" in sources  # (+ nvml where pynvml finds a GPU)
    assert (tmp_path / "out" / "tegrastats.log").read_text().startswith("RAM 2100/7620MB")
