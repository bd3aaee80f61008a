"""profile.json for one artifact (schema "edgecompress.profile/1", docs "profiler-and-targets" §F.4)."""

from __future__ import annotations

import time

import numpy as np

from edgecompress.runtimes.profiler import fingerprint, roofline
from edgecompress.runtimes.profiler.results import memory_row, test_row
from edgecompress.runtimes.profiler.settings import Shape

SCHEMA = "edgecompress.profile/1"
CPU = "CPUExecutionProvider"


def assemble(item, shapes: list[Shape], settings, device: dict, schedule: list[dict], samplers: dict,
             host, live_emc_mhz) -> dict:
    artifact, layout = item.artifact, item.layout
    cost = roofline.graph_cost(artifact.graph, layout.num_layers, layout.kv_heads, artifact.heads or layout.kv_heads,
                               layout.head_dim, np.dtype(layout.dtype).itemsize)
    bw, bw_source = roofline.bandwidth(item.target, device.get("jetson"), live_emc_mhz)
    peak, peak_dtype = roofline.peak_for(item.target, np.dtype(layout.dtype).name)
    on_target = _measured_on_target(item, device)
    warnings, tests = [], []
    for shape, requests in zip(shapes, item.requests):
        row, row_warnings = test_row(shape, requests)
        row["memory"] = memory_row(requests, samplers, host.source if host else None)
        measured = (row["ttft_ms"] and row["ttft_ms"]["mean"], row["itl_ms"] and row["itl_ms"]["mean"])
        row["roofline"] = roofline.shape_estimates(shape, cost, bw, peak, item.target,
                                                  measured if on_target else (None, None))
        tests.append(row)
        warnings += row_warnings
    warnings += _warnings(item, settings, device)
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "artifact": artifact.describe(layout),
        "device": device,
        "settings": _settings(item, settings),
        "load_ms": item.load.get("load_ms"),
        "first_run_ms": item.load.get("first_run_ms"),
        "memory": _memory(item, host, samplers),
        "tests": tests,
        "schedule": schedule,
        "roofline": _roofline(tests, cost, (bw, bw_source), (peak, peak_dtype), item.target, on_target),
        "ops": None,
        "warnings": warnings,
        "notes": [] if item.last_logits_only else [
            "onnxruntime returns logits for every prompt position (the artifact has no logits_to_keep input, or IO "
            "binding cannot feed it): TTFT includes the full logits tensor"],
    }


def _measured_on_target(item, device: dict) -> bool:
    """Whether the roofline target is the device the numbers were measured on (else: a prediction).

    CPU: a CPU target the artifact was built for. GPU: the target's architecture is the GPU's, and a
    Jetson target runs on a Jetson (sm_87 modules are told apart only by the user's --target)."""
    on_cpu = item.provider == CPU
    if (item.target.device == "cpu") != on_cpu:
        return False
    if on_cpu:
        return item.target.name == item.artifact.build_target.name
    sm = (device.get("gpu") or {}).get("sm")
    return item.target.arch == f"sm_{sm}" and bool(item.target.shared_memory) == bool(device.get("jetson"))


def _roofline(tests: list[dict], cost, bandwidth: tuple, peak: tuple, target, on_target: bool) -> dict:
    section = {
        "label": roofline.LABEL if on_target else f"prediction for {target.name} (not the device measured here)",
        "target": target.name,
        "measured_on_target": on_target,
        "bw_gbs": bandwidth[0],
        "bw_source": bandwidth[1],
        "peak_tflops": peak[0],
        "dtype": peak[1],
        "bw_efficiency": target.bw_efficiency,
        "compute_efficiency": target.compute_efficiency,
        "weight_bytes": cost.weight_bytes,
        "gather_row_bytes": cost.gather_row_bytes,
        "kv_bytes_per_token": cost.kv_token_bytes(),
    }
    for phase in ("decode", "prefill"):
        for row in tests:
            if phase in row["roofline"]:
                section[phase] = {"test": row["key"], **row["roofline"][phase]}
                break
    return section


def _settings(item, settings) -> dict:
    return {
        "ep": item.provider, "providers": item.providers, "provider_options": item.provider_options,
        "threads": settings.threads, "io_binding": item.io_binding, "shared_kv_buffer": item.shared_kv_buffer,
        "warmup": settings.warmup,
        "repetitions": settings.repetitions, "seed": settings.seed, "spinning": settings.spinning,
        "prompt": f"text {settings.prompt_text}" if settings.prompt_text else f"random ids (seed {settings.seed})",
        "tokenize_ms": item.tokenize_ms, "ops": settings.ops, "ops_steps": settings.ops_steps,
        "memory": settings.memory, "sample_ms": settings.sample_ms, "warmup_shape": item.load.get("warmup_shape"),
        "order": "rep -> test -> artifact (interleaved)",
    }


def _memory(item, host, samplers: dict) -> dict | None:
    if host is None:
        return None
    section = {key: value for key, value in item.load.items() if key.startswith("host_")}
    section["source"] = [host.source] + [s.source() if name == "nvml" else name for name, s in samplers.items()]
    section["note"] = ("host peaks are the kernel's VmHWM, reset per phase" if host.source == "vmhwm"
                       else "ru_maxrss: the process's lifetime peak (clear_refs not writable)")
    if item.load.get("nvmap_process_mb") is not None:
        section["nvmap_process_mb"] = item.load["nvmap_process_mb"]
    return section


def _warnings(item, settings, device: dict) -> list[str]:
    warnings = []
    if settings.warmup == 0:
        warnings.append("no warm-up (-w 0): the first timed repetition includes onnxruntime's first-run overhead")
    mode = fingerprint.power_mode_warning(device, item.target.expected_power_mode)
    if mode:
        warnings.append(mode)
    return warnings
