"""`profile_artifacts`: check every input, load, warm up, time the tests interleaved, then profile ops.

Order (docs "profiler-and-targets" §F.3): everything that can be refused is checked before the first
session is created; load time and the first run are reported on their own; warm-up requests are
dropped; repetitions run round by round (rep → test → artifact), so a shared machine's drift
spreads over every row instead of landing on whichever ran last; the op profile comes last, from its
own session, and never touches the timed numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgecompress.targets import profiles
from edgecompress.errors import first_line
from edgecompress.runtimes.artifact_files import load_tokenizer
from edgecompress.runtimes.errors import ArtifactRuntimeError
from edgecompress.runtimes.profiler import fingerprint, memory
from edgecompress.runtimes.profiler.artifact import Artifact, open_artifact
from edgecompress.runtimes.profiler.assemble import assemble
from edgecompress.runtimes.profiler.loop import Request, Runner, run_request, token_ids, warmup_shape
from edgecompress.runtimes.profiler.ops import op_profile
from edgecompress.runtimes.profiler.settings import GPU_PROVIDERS, ProfileSettings, Shape
from edgecompress.runtimes.session import create_session


@dataclass
class Loaded:
    """One artifact ready to time, and everything measured on it."""

    artifact: Artifact
    provider: str
    providers: list[str]
    provider_options: list[dict]
    io_binding: bool
    target: profiles.TargetProfile  # for the roofline
    ids: list[np.ndarray]  # one per test
    tokenize_ms: float | None = None
    session: ort.InferenceSession | None = None
    runner: Runner | None = None
    layout: object = None  # the KV layout, kept when the session is released
    last_logits_only: bool = False  # prefill asked for the last position's logits (logits_to_keep, no IO binding)
    shared_kv_buffer: bool = False  # the cache was one buffer per layer written in place (contract.SHARED_KV_BUFFER)
    load: dict = field(default_factory=dict)
    requests: list[list[Request]] = field(default_factory=list)
    ops: dict | None = None
    trace: Path | None = None


def plan(artifact: Artifact, settings: ProfileSettings, shapes: list[Shape]) -> Loaded:
    """Provider, roofline target, token ids and the context check: every refusal before loading."""
    available = ort.get_available_providers()
    provider = settings.provider(list(artifact.build_target.execution_provider), available)
    target = profiles.load_profile(settings.target) if settings.target else artifact.build_target
    context = artifact.context_length
    for shape in shapes:
        if context is not None and shape.tokens > context:
            raise ArtifactRuntimeError(f"test {shape.key} needs {shape.tokens} positions; the model's context "
                                       f"is {context} tokens")
    text_ids, tokenize_ms = _prompt_text(artifact, settings.prompt_text)
    providers = [provider] + ([] if provider == "CPUExecutionProvider" else ["CPUExecutionProvider"])
    options = [dict(artifact.build_target.provider_options.get(name, {})) for name in providers]
    io_binding = settings.io_binding if settings.io_binding is not None else provider in GPU_PROVIDERS
    ids = [token_ids(shape, max(artifact.vocab, 2), settings.seed, text_ids) for shape in shapes]
    return Loaded(artifact, provider, providers, options, io_binding, target, ids, tokenize_ms)


def _prompt_text(artifact: Artifact, path: str | None) -> tuple[list[int] | None, float | None]:
    if path is None:
        return None, None
    file = Path(path)
    if not file.is_file():
        raise ArtifactRuntimeError(f"--prompt-text file '{path}' does not exist")
    tokenizer = load_tokenizer(artifact.folder)
    started = time.perf_counter_ns()
    ids = tokenizer.encode(file.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False).ids
    tokenize_ms = (time.perf_counter_ns() - started) * 1e-6
    if not ids:
        raise ArtifactRuntimeError(f"--prompt-text file '{path}' has no tokens")
    return ids, tokenize_ms


def load(item: Loaded, settings: ProfileSettings, host: memory.HostMemory | None) -> None:
    before = host.current_mb() if host else None
    if host:
        host.reset()
    started = time.perf_counter_ns()
    item.session = create_session(item.artifact.folder, providers=item.providers, threads=settings.threads,
                                  provider_options=item.provider_options, session_config=_session_config(settings))
    item.load["load_ms"] = (time.perf_counter_ns() - started) * 1e-6
    if host:
        item.load.update(host_rss_before_load_mb=before, host_rss_load_peak_mb=host.peak_mb(),
                         host_rss_after_load_mb=host.current_mb())
    item.runner = Runner(item.session, item.io_binding)
    item.layout = item.runner.layout
    item.last_logits_only = bool(item.runner.last_only) and not item.io_binding  # a shared cache prefills unbound
    item.shared_kv_buffer = item.runner.shared


def release(item: Loaded) -> None:
    """Drop the timed session (its memory) before the op-profiling pass; keep what was measured."""
    item.load["first_run_ms"] = item.runner.first_call_ns * 1e-6 if item.runner.first_call_ns else None
    nvmap = memory.nvmap_process_mb()
    if nvmap is not None:
        item.load["nvmap_process_mb"] = nvmap
    item.runner = item.session = None


def _session_config(settings: ProfileSettings) -> dict[str, str]:
    return {} if settings.spinning else {"session.intra_op.allow_spinning": "0"}


def warm_up(item: Loaded, shapes: list[Shape], settings: ProfileSettings) -> None:
    """`settings.warmup` requests at the largest shape, dropped; the very first call is first_run_ms."""
    shape = warmup_shape(shapes)
    context = item.artifact.context_length
    if context is not None and shape.tokens > context:  # the longest prefill and the most steps, capped
        shape = Shape(shape.n_prompt, max(1, context - shape.n_prompt + 1), 0, shape.batch)
    ids = token_ids(shape, max(item.artifact.vocab, 2), settings.seed)
    for _ in range(settings.warmup):
        _guarded(lambda: run_request(item.runner, shape, ids), "the warm-up")
    item.load["warmup_shape"] = shape.key


def _guarded(call, what: str):
    """onnxruntime failures while running (a shape the graph refuses, out of memory) as one line."""
    try:
        return call()
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):  # its Fail/InvalidArgument/...; a bug stays a bug
            raise
        raise ArtifactRuntimeError(f"onnxruntime failed in {what}: {first_line(exc)}") from None


def interleave(items: list[Loaded], shapes: list[Shape], settings: ProfileSettings,
               host: memory.HostMemory | None, progress=None) -> list[dict]:
    """Every repetition of every test on every artifact, round by round; returns the order run."""
    schedule = []
    for item in items:
        item.requests = [[] for _ in shapes]
    for rep in range(settings.repetitions):
        for index, shape in enumerate(shapes):
            for number, item in enumerate(items):
                request = _guarded(lambda: run_request(item.runner, shape, item.ids[index], host), f"test {shape.key}")
                item.requests[index].append(request)
                schedule.append({"rep": rep, "test": shape.key, "artifact": number})
                if progress:
                    progress(f"rep {rep + 1}/{settings.repetitions} {shape.key} {item.artifact.folder.name}")
    return schedule


def profile_ops(item: Loaded, shapes: list[Shape], settings: ProfileSettings, bw_gbs) -> None:
    first = shapes[0]
    prefill = token_ids(first, max(item.artifact.vocab, 2), settings.seed)[:, : max(first.n_depth + first.n_prompt, 1)]
    steps = settings.ops_steps
    context = item.artifact.context_length
    if context is not None:
        steps = max(1, min(steps, context - prefill.shape[1]))
    item.ops, item.trace = _guarded(
        lambda: op_profile(item.artifact.folder, item.artifact.graph, item.providers, settings.threads,
                           item.io_binding, prefill, steps, bw_gbs,
                           session_kwargs={"provider_options": item.provider_options,
                                           "session_config": _session_config(settings)}), "the op-profiling pass")


def start_samplers(settings: ProfileSettings) -> dict:
    samplers = {}
    if settings.memory:
        for name, make in (("nvml", memory.NvmlSampler.create), ("tegrastats", memory.TegrastatsSampler.create)):
            sampler = make(settings.sample_ms)
            if sampler is not None:
                sampler.start()
                samplers[name] = sampler
    return samplers


def profile_artifacts(artifacts: list, settings: ProfileSettings | None = None, progress=None) -> list[dict]:
    """Profile several artifacts in one interleaved run (each gets its own result, as profile_artifact's)."""
    settings = settings or ProfileSettings()
    settings.validate()
    shapes = settings.tests()
    items = [plan(open_artifact(path), settings, shapes) for path in artifacts]
    device = fingerprint.describe()
    host = memory.HostMemory() if settings.memory else None
    samplers = start_samplers(settings)
    try:
        for item in items:
            load(item, settings, host)
            warm_up(item, shapes, settings)
        schedule = interleave(items, shapes, settings, host, progress)
        live_emc = samplers["tegrastats"].latest("emc_mhz") if "tegrastats" in samplers else None
    finally:
        for sampler in samplers.values():
            sampler.stop()
    for item in items:
        release(item)
    results = []
    for item in items:
        result = assemble(item, shapes, settings, device, schedule, samplers, host, live_emc)
        if settings.ops:
            profile_ops(item, shapes, settings, result["roofline"]["bw_gbs"])
            result["ops"] = {**item.ops, "trace": str(item.trace)}
        results.append(result)
    raw = samplers["tegrastats"].raw if "tegrastats" in samplers else None
    for result in results:
        result["_files"] = {"tegrastats.log": raw} if raw else {}
    return results
