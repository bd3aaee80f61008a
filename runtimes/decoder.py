"""A KV-cache decoder loop over an exported artifact: the runtime half of every parity check.

The graph I/O contract (see README, "Artifact contract"): input_ids, attention_mask, position_ids and
past_key_values.{i}.key/.value in; logits and present.{i}.key/.value out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from edgecompress.runtimes.session import create_session

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@dataclass
class KVLayout:
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: type


def kv_layout(session) -> KVLayout:
    pasts = {}
    for inp in session.get_inputs():
        match = _PAST.match(inp.name)
        if match:
            pasts[int(match.group(1))] = inp
    if not pasts:
        raise ValueError("the model has no past_key_values.* inputs")
    first = pasts[0]
    dtype = np.float16 if "float16" in first.type else np.float32
    return KVLayout(len(pasts), int(first.shape[1]), int(first.shape[3]), dtype)


class OrtDecoder:
    """Runs an artifact step by step, carrying the KV cache between calls."""

    def __init__(self, artifact, session=None, **session_kwargs):
        self.session = session or create_session(artifact, **session_kwargs)
        self.layout = kv_layout(self.session)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.layout.kv_heads, 0, self.layout.head_dim)
        return [np.zeros(shape, dtype=self.layout.dtype) for _ in range(2 * self.layout.num_layers)]

    def forward(self, input_ids, attention_mask, position_ids, past):
        feed = {
            "input_ids": np.asarray(input_ids, dtype=np.int64),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
            "position_ids": np.asarray(position_ids, dtype=np.int64),
        }
        for i in range(self.layout.num_layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        present = []
        for i in range(self.layout.num_layers):
            present += [outputs[f"present.{i}.key"], outputs[f"present.{i}.value"]]
        return outputs["logits"], present

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: tuple[int, ...] = ()) -> list[int]:
        """Greedy tokens for one prompt: prefill once, then one token per step through the cache."""
        tokens: list[int] = []
        if max_new_tokens <= 0:
            return tokens
        ids = np.asarray([prompt_ids], dtype=np.int64)
        past = self.empty_cache(1)
        length = 0
        while True:
            step = ids.shape[1]
            mask = np.ones((1, length + step), dtype=np.int64)
            positions = np.arange(length, length + step, dtype=np.int64)[None, :]
            logits, past = self.forward(ids, mask, positions, past)
            length += step
            token = int(np.argmax(logits[0, -1]))
            tokens.append(token)
            if len(tokens) >= max_new_tokens or token in eos_ids:
                return tokens
            ids = np.asarray([[token]], dtype=np.int64)
