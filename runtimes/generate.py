"""Text generation from an artifact folder with onnxruntime, numpy, tokenizers and jinja2 only.

This is the reference for what an app on the device needs: check the folder against its manifest,
tokenize (optionally through the chat template), prefill once, then one token per step through the
KV cache until an eos id from genai_config.json or the token budget, streaming text as it completes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from edgecompress.contract import GENAI_CONFIG_FILE, TOKENIZER_CONFIG_FILE
from edgecompress.runtimes.artifact_files import artifact_folder, artifact_providers, load_tokenizer, read_json, verify_manifest
from edgecompress.runtimes.chat import ChatTemplate
from edgecompress.runtimes.decoder import OrtDecoder
from edgecompress.runtimes.detokenize import IncrementalDetokenizer
from edgecompress.runtimes.errors import ArtifactRuntimeError
from edgecompress.runtimes.kv_steps import make_steps
from edgecompress.runtimes.sampling import SamplingSettings, choose_token
from edgecompress.runtimes.session import create_session


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)  # generated ids, the eos id included when reached
    text: str = ""
    stopped: str = "max_new_tokens"  # or "eos", "context"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = len(self.tokens) - 1  # the first token comes from the prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "tokens": self.tokens,
            "text": self.text,
            "stopped": self.stopped,
            "prefill_seconds": round(self.prefill_seconds, 4),
            "decode_seconds": round(self.decode_seconds, 4),
            "decode_tokens_per_second": round(self.decode_tokens_per_second, 2),
        }


class TextGenerator:
    """Loads an artifact once; `generate` / `stream_tokens` can then run many prompts."""

    def __init__(self, artifact, providers=None, threads=None, verify: str = "sha256", io_binding=None, **session_kwargs):
        self.folder = artifact_folder(artifact)
        if verify != "none":
            verify_manifest(self.folder, hashes=verify == "sha256")
        genai = read_json(self.folder, GENAI_CONFIG_FILE)["model"]
        self.eos_ids = tuple(int(i) for i in _as_list(genai.get("eos_token_id")))
        self.bos_id = genai.get("bos_token_id")
        self.context_length = int(genai.get("context_length") or 0) or None
        self.tokenizer = load_tokenizer(self.folder)
        self.tokenizer_config = read_json(self.folder, TOKENIZER_CONFIG_FILE, required=False)
        self._chat_template: ChatTemplate | None = None
        # The artifact's target's providers when none are asked for; CPU with a warning when they are not here.
        providers, self.warnings = artifact_providers(self.folder, providers)
        session = create_session(self.folder, providers=providers, threads=threads, **session_kwargs)
        self.decoder = OrtDecoder(self.folder, session=session)
        self.io_binding = io_binding

    # --- prompts -----------------------------------------------------------------------------
    @property
    def chat_template(self) -> ChatTemplate:
        if self._chat_template is None:
            self._chat_template = ChatTemplate.from_folder(self.folder, self.tokenizer_config)
        return self._chat_template

    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            return self.encode_messages(messages)
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids

    def encode_messages(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)
        # The template already wrote the special tokens; the tokenizer must not add more.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    # --- generation ----------------------------------------------------------------------------
    def stream_tokens(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingSettings | None = None,
                      result: GenerationResult | None = None) -> Iterator[int]:
        """Yield generated token ids one by one (the eos id too, last)."""
        sampling = sampling or SamplingSettings()
        sampling.validate()
        result = result or GenerationResult(prompt_tokens=len(prompt_ids))
        ids = list(prompt_ids)
        if not ids:  # an empty prompt starts from the beginning-of-sequence token
            if self.bos_id is None:
                return
            ids = [int(self.bos_id)]
        if self.context_length is not None and len(ids) >= self.context_length:
            raise ArtifactRuntimeError(
                f"the prompt has {len(ids)} tokens; the model's context is {self.context_length} tokens"
            )
        budget = max_new_tokens
        if self.context_length is not None:
            budget = min(budget, self.context_length - len(ids))
        if budget <= 0:
            return
        rng = np.random.default_rng(sampling.seed)
        step = make_steps(self.decoder, self.io_binding, capacity=len(ids) + budget)
        started = time.perf_counter()
        while True:
            logits = step(ids)
            token = choose_token(logits, sampling, rng)
            now = time.perf_counter()
            if not result.tokens:
                result.prefill_seconds = now - started
            else:
                result.decode_seconds = now - started - result.prefill_seconds
            result.tokens.append(token)
            # The reason is recorded before yielding: a consumer may stop iterating at the eos id.
            if token in self.eos_ids:
                result.stopped = "eos"
            elif len(result.tokens) >= budget:
                result.stopped = "max_new_tokens" if len(result.tokens) >= max_new_tokens else "context"
            yield token
            if token in self.eos_ids or len(result.tokens) >= budget:
                return
            ids = [token]

    def generate(self, prompt: str = "", max_new_tokens: int = 128, sampling: SamplingSettings | None = None,
                 chat: bool = False, system: str | None = None, messages: list[dict] | None = None,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Generate for a prompt (or chat `messages`), calling `on_text` with each completed piece of text."""
        prompt_ids = self.encode_messages(messages) if messages is not None else self.encode(prompt, chat, system)
        result = GenerationResult(prompt_tokens=len(prompt_ids))
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        pieces = []
        for token in self.stream_tokens(prompt_ids, max_new_tokens, sampling, result):
            if token in self.eos_ids:
                break
            piece = detokenizer.add(token)
            if piece:
                pieces.append(piece)
                if on_text:
                    on_text(piece)
        tail = detokenizer.flush()
        if tail:
            pieces.append(tail)
            if on_text:
                on_text(tail)
        result.text = "".join(pieces)
        return result


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
