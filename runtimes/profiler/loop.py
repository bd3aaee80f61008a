"""The timed loop (docs "profiler-and-targets" §F.3): one request per test and repetition.

Only `session.run` (or `run_with_iobinding`) and the greedy argmax in numpy sit between the two
perf_counter_ns reads of a step; inputs are built before, and the KV cache is carried by reference
(numpy arrays, or OrtValues on the session's device with IO binding, so a GPU cache never leaves it).
Depth tokens are prefilled untimed. Memory peaks are reset and read outside the timed spans.
An artifact whose cache may be shared in place (contract.SHARED_KV_BUFFER) runs as its apps would: one
buffer per cache sized for the request, bound as past and present, written in place by the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from edgecompress import contract
from edgecompress.runtimes.decoder import kv_layout, last_logits_feed, shares_kv_buffer
from edgecompress.runtimes.profiler.settings import Shape


@dataclass
class Step:
    tokens: np.ndarray  # [batch] greedy ids
    run_ns: int  # session.run alone
    total_ns: int  # run + logits to host + argmax: the step's latency


class Runner:
    """One session's forward steps with the KV cache carried between calls."""

    def __init__(self, session: ort.InferenceSession, io_binding: bool):
        self.session = session
        self.layout = kv_layout(session)
        self.io_binding = io_binding
        self.output_names = [o.name for o in session.get_outputs()]
        self.past_names = contract.past_names(self.layout.num_layers)
        self.present_names = contract.present_names(self.layout.num_layers)
        gpu = any(p in session.get_providers()[0] for p in ("CUDA", "Tensorrt"))
        self.device = "cuda" if gpu else "cpu"
        self.past: list = []
        self.length = 0
        self.first_call_ns: int | None = None  # the session's very first run: first-run overhead included
        self.last_only = last_logits_feed(session)  # only the last position's logits are read
        self.shared = shares_kv_buffer(session)
        self.buffers: list | None = None  # the shared caches, when `shared`

    def reset(self, batch: int, capacity: int = 0) -> None:
        """An empty cache for `batch` rows: a shared buffer of `capacity` tokens where the artifact allows."""
        self.buffers = None
        shape = (batch, self.layout.kv_heads, capacity if self.shared else 0, self.layout.head_dim)
        empty = [np.zeros(shape, dtype=self.layout.dtype) for _ in self.past_names]
        if self.io_binding or self.shared:
            self._hosts = empty  # a CPU OrtValue aliases its array: keep it alive
            empty = [ort.OrtValue.ortvalue_from_numpy(array, self.device, 0) for array in empty]
        if self.shared:
            self.buffers = empty
        self.past, self.length = empty, 0

    def _prefills_unbound(self) -> bool:
        """A shared CPU cache's first step runs without IO binding, as SharedSteps does: logits_to_keep then
        computes the last position only, and the prompt's cache is copied once into the buffers."""
        return self.buffers is not None and self.length == 0 and bool(self.last_only) and self.device == "cpu" \
            and not self.io_binding

    def _inputs(self, ids: np.ndarray, bound: bool) -> dict[str, np.ndarray]:
        batch, step = ids.shape
        positions = np.arange(self.length, self.length + step, dtype=np.int64)
        return {
            contract.INPUT_IDS: np.ascontiguousarray(ids, dtype=np.int64),
            contract.ATTENTION_MASK: np.ones((batch, self.length + step), dtype=np.int64),
            contract.POSITION_IDS: np.ascontiguousarray(np.broadcast_to(positions, (batch, step))),
            **({} if bound else self.last_only),  # IO binding cannot bind an input with a default
        }

    def step(self, ids: np.ndarray) -> Step:
        """Run `ids` [batch, tokens] after the cached ones; greedy next ids from the last position."""
        bound = self.io_binding or (self.buffers is not None and not self._prefills_unbound())
        inputs = self._inputs(ids, bound)
        if bound:
            return self._bound_step(inputs, ids.shape[1])
        empty = (ids.shape[0], self.layout.kv_heads, 0, self.layout.head_dim)
        past = [np.zeros(empty, self.layout.dtype) for _ in self.past_names] if self.buffers is not None else self.past
        feed = {**inputs, **dict(zip(self.past_names, past))}
        start = time.perf_counter_ns()
        outputs = self.session.run(self.output_names, feed)
        named = dict(zip(self.output_names, outputs))
        if self.buffers is not None:  # the prompt's cache into the shared buffers: part of the prefill
            for host, name in zip(self._hosts, self.present_names):
                host[:, :, : ids.shape[1]] = named[name]
        ran = time.perf_counter_ns()
        tokens = outputs[0][:, -1].argmax(axis=-1)
        done = time.perf_counter_ns()
        self.past = self.buffers if self.buffers is not None else [named[name] for name in self.present_names]
        self.length += ids.shape[1]
        return self._record(Step(tokens, ran - start, done - start))

    def _bound_step(self, inputs: dict[str, np.ndarray], count: int) -> Step:
        binding = self.session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, array)
        for name, value in zip(self.past_names, self.past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(contract.LOGITS, self.device, 0)
        for name, buffer in zip(self.present_names, self.buffers or [None] * len(self.present_names)):
            if buffer is None:
                binding.bind_output(name, self.device, 0)
            else:
                binding.bind_ortvalue_output(name, buffer)  # written in place
        start = time.perf_counter_ns()
        self.session.run_with_iobinding(binding)
        ran = time.perf_counter_ns()
        outputs = binding.get_outputs()  # in bind order
        tokens = outputs[0].numpy()[:, -1].argmax(axis=-1)
        done = time.perf_counter_ns()
        self.past = list(outputs[1:]) if self.buffers is None else self.buffers
        self.length += count
        return self._record(Step(tokens, ran - start, done - start))

    def _record(self, step: Step) -> Step:
        if self.first_call_ns is None:
            self.first_call_ns = step.total_ns
        return step


@dataclass
class Request:
    """One repetition of one test: its timings in ns and the spans that memory samplers look at."""

    ttft_ns: int | None = None
    itl_ns: list[int] = field(default_factory=list)
    e2e_ns: int | None = None
    sampling_ns: list[int] = field(default_factory=list)  # logits to host + argmax, per timed step
    window: tuple[int, int] = (0, 0)
    host_prefill_peak_mb: float | None = None
    host_decode_peak_mb: float | None = None


def run_request(runner: Runner, shape: Shape, ids: np.ndarray, host=None) -> Request:
    """Depth untimed, then the timed prefill and/or decode steps. `ids` holds depth + prompt tokens,
    plus one more column: the first decode input of a test without a timed prefill."""
    request = Request()
    runner.reset(shape.batch, capacity=ids.shape[1] + shape.decode_steps)
    next_ids = ids[:, -1:]
    if shape.n_depth:
        next_ids = runner.step(ids[:, : shape.n_depth]).tokens[:, None]
    if host is not None:  # after the untimed depth: the prefill peak is the timed prefill's
        host.reset()
    start = time.perf_counter_ns()
    prefill_ns = 0
    if shape.n_prompt:
        step = runner.step(ids[:, shape.n_depth : shape.n_depth + shape.n_prompt])
        request.ttft_ns = step.total_ns
        request.sampling_ns.append(step.total_ns - step.run_ns)
        next_ids = step.tokens[:, None]
        prefill_ns = time.perf_counter_ns() - start
    if host is not None:  # outside the timed spans: e2e below leaves this bookkeeping out
        request.host_prefill_peak_mb = host.peak_mb()
        host.reset()
    decode_start = time.perf_counter_ns()
    for _ in range(shape.decode_steps):
        step = runner.step(next_ids)
        request.itl_ns.append(step.total_ns)
        request.sampling_ns.append(step.total_ns - step.run_ns)
        next_ids = step.tokens[:, None]
    end = time.perf_counter_ns()
    if host is not None and shape.decode_steps:
        request.host_decode_peak_mb = host.peak_mb()
    # The prefill span plus the decode span: the memory bookkeeping between them is not timed, and a
    # decode-only test's e2e starts at its first decode step (the depth prefill is not part of it).
    request.e2e_ns = prefill_ns + (end - decode_start)
    request.window = (start, end)
    return request


def token_ids(shape: Shape, vocab: int, seed: int, text_ids: list[int] | None = None) -> np.ndarray:
    """[batch, depth + prompt + 1] ids: random (fixed seed, like llama-bench) or cycled from a text."""
    width = shape.n_depth + shape.n_prompt + 1
    if text_ids:
        row = np.resize(np.asarray(text_ids, dtype=np.int64), width)
        return np.tile(row, (shape.batch, 1))
    rng = np.random.default_rng([seed, shape.n_prompt, shape.n_gen, shape.n_depth, shape.batch])
    return rng.integers(0, vocab, size=(shape.batch, width), dtype=np.int64)


def warmup_shape(shapes: list[Shape]) -> Shape:
    """One request at the largest shape: the longest prefill, then the most decode steps."""
    prefill = max(s.n_depth + s.n_prompt for s in shapes)
    steps = max(s.decode_steps for s in shapes)
    return Shape(max(prefill, 1), steps + 1, 0, max(s.batch for s in shapes))
