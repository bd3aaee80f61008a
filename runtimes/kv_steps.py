"""One forward step with the KV cache carried between calls, in two flavours.

`NumpySteps` feeds numpy arrays (simple; the cache round-trips through host memory every step).
`BoundSteps` uses IO binding: the cache stays as OrtValues on the session's device and the presents
of one step are bound as the pasts of the next, so on CUDA only the token ids go in and the logits
come out. `SharedSteps` (artifacts marked contract.SHARED_KV_BUFFER) binds one preallocated [1, kv_heads, capacity,
head_dim] buffer per cache as both the past and the present: GroupQueryAttention writes the new tokens in
place, so no step copies the cache. All three give the same numbers; generation picks SharedSteps where the
artifact allows it, else BoundSteps when a CUDA provider is in use.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edgecompress import contract
from edgecompress.runtimes.decoder import OrtDecoder
from edgecompress.runtimes.errors import ArtifactRuntimeError


def _step_inputs(ids: list[int], past_length: int) -> dict[str, np.ndarray]:
    step = len(ids)
    return {
        contract.INPUT_IDS: np.asarray([ids], dtype=np.int64),
        contract.ATTENTION_MASK: np.ones((1, past_length + step), dtype=np.int64),
        contract.POSITION_IDS: np.arange(past_length, past_length + step, dtype=np.int64)[None, :],
    }


class NumpySteps:
    def __init__(self, decoder: OrtDecoder):
        self.decoder = decoder
        self.past = decoder.empty_cache(1)
        self.length = 0

    def __call__(self, ids: list[int]) -> np.ndarray:
        """Run `ids` after the cached tokens; return the last position's logits."""
        feed = _step_inputs(ids, self.length)
        logits, self.past = self.decoder.forward(feed["input_ids"], feed["attention_mask"], feed["position_ids"], self.past,
                                                 last_only=True)
        self.length += len(ids)
        return logits[0, -1]


class BoundSteps:
    def __init__(self, decoder: OrtDecoder, device: str = "cpu", device_id: int = 0):
        self.decoder = decoder
        self.session = decoder.session
        self.device, self.device_id = device, device_id
        self.past = [
            ort.OrtValue.ortvalue_from_numpy(array, device, device_id) for array in decoder.empty_cache(1)
        ]
        self.length = 0

    def __call__(self, ids: list[int]) -> np.ndarray:
        binding = self.session.io_binding()
        # No logits_to_keep here: onnxruntime's IO binding does not find an input that has a default
        # ("Failed to find NodeArg"), so bound steps compute every position's logits.
        for name, array in _step_inputs(ids, self.length).items():
            binding.bind_cpu_input(name, array)  # a few int64s: onnxruntime copies them where needed
        for name, value in zip(self.decoder.past_names, self.past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(contract.LOGITS, self.device, self.device_id)
        for name in self.decoder.present_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in bind_output order
        self.past = list(outputs[1:])
        self.length += len(ids)
        return outputs[0].numpy()[0, -1]


class SharedSteps:
    """One buffer per cache, `capacity` tokens long, bound as past and present: written in place."""

    def __init__(self, decoder: OrtDecoder, capacity: int, device: str = "cpu", device_id: int = 0):
        if not decoder.shares_kv_buffer:
            raise ArtifactRuntimeError("this artifact's KV cache cannot be shared in place (rebuild it with --fuse)")
        self.decoder, self.session, self.capacity = decoder, decoder.session, capacity
        self.device, self.device_id = device, device_id
        layout = decoder.layout
        shape = (1, layout.kv_heads, capacity, layout.head_dim)
        # Zeros, not uninitialized memory: rows past the cache's length are never read, but stay defined.
        self._host = [np.zeros(shape, dtype=layout.dtype) for _ in decoder.past_names]  # CPU OrtValues alias these
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(array, device, device_id) for array in self._host]
        self.length = 0

    def __call__(self, ids: list[int]) -> np.ndarray:
        if self.length + len(ids) > self.capacity:
            raise ArtifactRuntimeError(f"the KV buffer holds {self.capacity} tokens; "
                                       f"{self.length + len(ids)} do not fit")
        if self.length == 0 and self.decoder.last_only and self.device == "cpu":
            return self._prefill_last_logits(ids)
        binding = self.session.io_binding()
        for name, array in _step_inputs(ids, self.length).items():
            binding.bind_cpu_input(name, array)
        for past, present, buffer in zip(self.decoder.past_names, self.decoder.present_names, self.buffers):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        binding.bind_output(contract.LOGITS, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[-1]  # in bind order: the presents first, the logits last
        self.length += len(ids)
        return logits.numpy()[0, -1]

    def _prefill_last_logits(self, ids: list[int]) -> np.ndarray:
        """The prompt without IO binding, so that logits_to_keep (which IO binding cannot bind) computes the
        last position only; its caches are then copied once into the buffers (CPU OrtValues alias _host)."""
        feed = _step_inputs(ids, 0)
        logits, presents = self.decoder.forward(feed[contract.INPUT_IDS], feed[contract.ATTENTION_MASK],
                                                feed[contract.POSITION_IDS], self.decoder.empty_cache(1),
                                                last_only=True)
        for host, present in zip(self._host, presents):
            host[:, :, : len(ids)] = present
        self.length = len(ids)
        return logits[0, -1]


def greedy_in_place(decoder: OrtDecoder, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens through SharedSteps: what OrtDecoder.greedy gives with a copied cache."""
    steps, ids, tokens = SharedSteps(decoder, len(prompt_ids) + max_new_tokens), list(prompt_ids), []
    while len(tokens) < max_new_tokens:
        tokens.append(int(np.argmax(steps(ids))))
        ids = tokens[-1:]
    return tokens


def make_steps(decoder: OrtDecoder, io_binding: bool | None = None, capacity: int | None = None):
    """SharedSteps where the artifact allows it and `capacity` (the most tokens the cache will hold) is known;
    otherwise IO binding by default exactly when the session runs on CUDA."""
    on_cuda = "CUDAExecutionProvider" in decoder.session.get_providers()
    device = "cuda" if on_cuda else "cpu"
    if capacity is not None and decoder.shares_kv_buffer and io_binding is not False:
        return SharedSteps(decoder, capacity, device)
    if io_binding is None:
        io_binding = on_cuda
    if not io_binding:
        return NumpySteps(decoder)
    return BoundSteps(decoder, device)
