"""A KV-cache decoder loop over an exported artifact: the runtime half of every parity check.

The graph I/O follows `edgecompress.contract` (README, "Artifact contract"): input_ids,
attention_mask, position_ids and the past caches in; logits and the present caches out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecompress import contract
from edgecompress.runtimes.errors import ArtifactRuntimeError
from edgecompress.runtimes.session import create_session


@dataclass
class KVLayout:
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: type


def kv_layout(session) -> KVLayout:
    pasts = {}
    for inp in session.get_inputs():
        match = contract.PAST_INPUT.match(inp.name)
        if match:
            pasts[int(match.group(1))] = inp
    if not pasts:
        raise ArtifactRuntimeError(
            f"the model has no {contract.PAST_PREFIX}* inputs: not a KV-cache decoder exported by edgecompress"
        )
    first = pasts[0]
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    if first.type not in dtypes:  # numpy has no bfloat16: such a cache must stay on the device (IO binding)
        raise ArtifactRuntimeError(f"the KV cache is {first.type}; this runtime feeds float32 or float16 caches")
    dtype = dtypes[first.type]
    return KVLayout(len(pasts), int(first.shape[1]), int(first.shape[3]), dtype)


def last_logits_feed(session) -> dict[str, np.ndarray]:
    """The feed that asks for the last position's logits only: {logits_to_keep: 1} when the artifact has that
    input (a default it may override), else nothing (an older artifact computes every position)."""
    names = {value.name for value in session.get_overridable_initializers()}
    names |= {value.name for value in session.get_inputs()}
    return {contract.LOGITS_TO_KEEP: np.array(1, dtype=np.int64)} if contract.LOGITS_TO_KEEP in names else {}


def shares_kv_buffer(session) -> bool:
    """Whether the artifact's presents may be written in place into their pasts' buffers (contract.SHARED_KV_BUFFER)."""
    return session.get_modelmeta().custom_metadata_map.get(contract.SHARED_KV_BUFFER) == "1"


class OrtDecoder:
    """Runs an artifact step by step, carrying the KV cache between calls."""

    def __init__(self, artifact, session=None, **session_kwargs):
        self.session = session or create_session(artifact, **session_kwargs)
        self.layout = kv_layout(self.session)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = contract.past_names(self.layout.num_layers)
        self.present_names = contract.present_names(self.layout.num_layers)
        self.last_only = last_logits_feed(self.session)
        self.shares_kv_buffer = shares_kv_buffer(self.session)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.layout.kv_heads, 0, self.layout.head_dim)
        return [np.zeros(shape, dtype=self.layout.dtype) for _ in range(2 * self.layout.num_layers)]

    def forward(self, input_ids, attention_mask, position_ids, past, last_only: bool = False):
        """One step; `last_only`: logits for the last position only (where the artifact can: see last_logits_feed)."""
        feed = {
            **(self.last_only if last_only else {}),
            contract.INPUT_IDS: np.asarray(input_ids, dtype=np.int64),
            contract.ATTENTION_MASK: np.asarray(attention_mask, dtype=np.int64),
            contract.POSITION_IDS: np.asarray(position_ids, dtype=np.int64),
            **dict(zip(self.past_names, past)),
        }
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        return outputs[contract.LOGITS], [outputs[name] for name in self.present_names]

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
            logits, past = self.forward(ids, mask, positions, past, last_only=True)
            length += step
            token = int(np.argmax(logits[0, -1]))
            tokens.append(token)
            if len(tokens) >= max_new_tokens or token in eos_ids:
                return tokens
            ids = np.asarray([[token]], dtype=np.int64)
