"""One forward step with the KV cache carried between calls, in two flavours.

`NumpySteps` feeds numpy arrays (simple; the cache round-trips through host memory every step).
`BoundSteps` uses IO binding: the cache stays as OrtValues on the session's device and the presents
of one step are bound as the pasts of the next, so on CUDA only the token ids go in and the logits
come out. Both give the same numbers; generation picks BoundSteps when a CUDA provider is in use.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edgecompress import contract
from edgecompress.runtimes.decoder import OrtDecoder


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


def make_steps(decoder: OrtDecoder, io_binding: bool | None = None):
    """IO binding by default exactly when the session runs on CUDA."""
    on_cuda = "CUDAExecutionProvider" in decoder.session.get_providers()
    if io_binding is None:
        io_binding = on_cuda
    if not io_binding:
        return NumpySteps(decoder)
    return BoundSteps(decoder, "cuda" if on_cuda else "cpu")
