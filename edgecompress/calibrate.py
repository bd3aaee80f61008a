"""Calibration data: token windows for attribution, with enough metadata to hash and replay.

Where the text comes from is `edgecompress.runtimes.text_sources` (the user's file or `hf:` spec,
then $EDGECOMPRESS_DATA, then the `datasets` library); `self[:N]` is text the model generates itself,
and it is also the fallback, with a warning, when no text is found at all. A text is tokenized once
and cut into windows: consecutive from the start (the reference protocol: 16 x 512 tokens from the
start of wiki.valid.tokens), or at random offsets drawn by `seed` when a seed is given.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable

from edgecompress.errors import EdgeCompressError
from edgecompress.options import SELF, check_calibration_size, holdout_windows, is_self_spec, parse_self_spec
from edgecompress.runtimes import text_sources
from edgecompress.runtimes.text_sources import CALIBRATION, NoText, TextSource

SAMPLING_MODES = ("start", "random")


@dataclass
class CalibrationSet:
    """Token windows [n, seq_len] (int64) and where they came from."""

    input_ids: "torch.Tensor"  # noqa: F821  (torch is imported lazily)
    source: str
    source_sha256: str
    seed: int | None
    sampling: str = "start"
    extra: dict = field(default_factory=dict)  # how self-generated text was made; a fallback's reason
    # Windows of the same source kept out of fitting: they stop refits early and choose their settings.
    holdout_ids: "torch.Tensor | None" = None  # noqa: F821

    @property
    def n_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_holdout(self) -> int:
        return 0 if self.holdout_ids is None else int(self.holdout_ids.shape[0])

    def split_holdout(self, n_holdout: int) -> "CalibrationSet":
        """The last `n_holdout` windows become the held-out part (the windows are cut once, so fitting
        and held-out windows never share a token when drawn from the start)."""
        if n_holdout <= 0:
            return self
        if n_holdout >= self.n_sequences:
            raise EdgeCompressError(f"{self.n_sequences} calibration windows cannot keep {n_holdout} out for validation")
        self.input_ids, self.holdout_ids = self.input_ids[:-n_holdout], self.input_ids[-n_holdout:]
        return self

    def content_hash(self) -> str:
        """sha256 of the exact token windows plus how they were drawn (generation settings included)."""
        digest = hashlib.sha256()
        digest.update(self.input_ids.contiguous().cpu().numpy().astype("<i8").tobytes())
        digest.update(f"{self.n_sequences}x{self.seq_len}|{self.sampling}|{self.seed}".encode())
        if self.holdout_ids is not None:  # absent from older plans' hashes: same bytes for the same windows
            digest.update(b"holdout" + self.holdout_ids.contiguous().cpu().numpy().astype("<i8").tobytes())
        digest.update(self.source_sha256.encode())
        # How self-generated text was made is part of its identity; why it was used (a fallback) is not.
        made = {key: value for key, value in self.extra.items() if key != "fallback"}
        if made:
            digest.update(json.dumps(made, sort_keys=True).encode())
        return digest.hexdigest()

    def describe(self) -> dict:
        """JSON-ready metadata (no tokens)."""
        return {
            "source": self.source,
            "source_sha256": self.source_sha256,
            "n_sequences": self.n_sequences,
            "holdout_sequences": self.n_holdout,
            "seq_len": self.seq_len,
            "sampling": self.sampling,
            "seed": self.seed,
            **self.extra,
            "hash": self.content_hash(),
        }


def _tokenize(tokenizer, text: str) -> list[int]:
    """Whole text at once, no special tokens: windows are plain slices of one token stream."""
    if hasattr(tokenizer, "model_max_length"):
        # Avoid the harmless "sequence longer than max" warning for a whole corpus.
        encoded = tokenizer(text, add_special_tokens=False, verbose=False)
    else:
        encoded = tokenizer(text, add_special_tokens=False)
    return list(encoded["input_ids"])


def windows_from_tokens(tokens, n_sequences: int, seq_len: int, sampling: str = "start", seed: int | None = 0):
    """Cut [n_sequences, seq_len] windows from one token stream: consecutive from the start, or
    random offsets drawn by `seed` (windows may overlap, like SparseGPT's sampler)."""
    import torch

    check_calibration_size(n_sequences, seq_len)
    if sampling not in SAMPLING_MODES:
        raise EdgeCompressError(f"unknown sampling {sampling!r}: use one of {', '.join(SAMPLING_MODES)}")
    stream = torch.as_tensor(tokens, dtype=torch.int64)
    total = int(stream.numel())
    if total < seq_len:
        raise EdgeCompressError(f"calibration text has {total} tokens, shorter than one sequence of {seq_len}")
    if sampling == "start":
        available = total // seq_len
        if available < n_sequences:
            raise EdgeCompressError(
                f"calibration text has {total} tokens: {available} sequences of {seq_len} from the "
                f"start, {n_sequences} asked (use fewer, shorter, or --seed for random windows)"
            )
        return stream[: n_sequences * seq_len].reshape(n_sequences, seq_len).clone()
    generator = torch.Generator().manual_seed(seed or 0)
    starts = torch.randint(0, total - seq_len + 1, (n_sequences,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def from_text(source: TextSource, tokenizer, n_sequences: int, seq_len: int, seed: int | None = None,
              sampling: str | None = None, holdout: int = 0) -> CalibrationSet:
    """Windows of one text (the last `holdout` of them held out); random offsets when a seed is given
    (or sampling="random")."""
    sampling = sampling or ("random" if seed is not None else "start")
    tokens = _tokenize(tokenizer, source.text)
    available = len(tokens) // seq_len
    if holdout and sampling == "start" and available < n_sequences:
        raise EdgeCompressError(
            f"calibration text has {len(tokens)} tokens: {available} windows of {seq_len}, too few for "
            f"{n_sequences - holdout} fitting + {holdout} held-out windows (lower --calib-sequences or --calib-holdout)")
    input_ids = windows_from_tokens(tokens, n_sequences, seq_len, sampling, seed)
    return CalibrationSet(input_ids, source.description, source.sha256, seed, sampling).split_holdout(holdout)


def build_calibration(
    source: str | os.PathLike | None,
    tokenizer,
    n_sequences: int = 16,
    seq_len: int = 512,
    seed: int | None = None,
    sampling: str | None = None,
    *,
    model=None,
    generation_config=None,
    warn: Callable[[str], None] | None = None,
    device: str | None = None,
    holdout: int | None = 0,
) -> CalibrationSet:
    """The calibration set for `source` (a file, `hf:` spec, `self[:N]`, or None for the defaults).

    With no text found anywhere, falls back to `self` (which needs `model`), calling `warn` with a
    one-line reason that is also recorded in the set's metadata (so in the plan and the report).
    `device`: where self-generation runs (attribution's device; default: where the model is).
    `holdout`: windows drawn after the fitting ones and kept out of fitting (CalibrationSet.holdout_ids);
    None: options.holdout_windows' default."""
    holdout = holdout_windows(n_sequences, holdout)
    if is_self_spec(source):
        count = parse_self_spec(source) or n_sequences
        return self_generated(model, tokenizer, generation_config, count + holdout, seq_len, seed,
                              device=device).split_holdout(holdout)
    found = text_sources.resolve(source, CALIBRATION)
    if not isinstance(found, NoText):
        return from_text(found, tokenizer, n_sequences + holdout, seq_len, seed, sampling, holdout)
    message = f"{found.reason}: calibrating on {n_sequences} self-generated sequences (--calibration self)"
    if warn is not None:
        warn(message)
    calib = self_generated(model, tokenizer, generation_config, n_sequences + holdout, seq_len, seed, device=device)
    calib.extra["fallback"] = message
    return calib.split_holdout(holdout)



def sampling_settings(generation_config) -> dict:
    """The model's own sampling settings when its generation config samples; else plain sampling at
    temperature 1 (greedy decoding from one start token would give the same text N times)."""
    config = generation_config
    if config is not None and getattr(config, "do_sample", False):
        return {
            "temperature": float(getattr(config, "temperature", 1.0) or 1.0),
            "top_k": int(getattr(config, "top_k", 0) or 0),
            "top_p": float(getattr(config, "top_p", 1.0) or 1.0),
            "from": "the model's generation config",
        }
    return {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "from": "plain sampling (the model's config is greedy)"}


def self_generated(model, tokenizer, generation_config, n_sequences: int, seq_len: int, seed: int | None,
                   batch_size: int = 16, device: str | None = None) -> CalibrationSet:
    """N sequences of `seq_len` tokens sampled by the model from its beginning-of-sequence token.

    Every sequence runs to full length (end-of-sequence is suppressed until then); the seed (0 by
    default) and the sampling settings are recorded and hashed, so the same model gives the same set."""
    import torch

    if model is None:
        raise EdgeCompressError("self-generated calibration needs the model")
    check_calibration_size(n_sequences, seq_len)
    seed = 0 if seed is None else seed
    start = _start_token(tokenizer, generation_config)
    settings = sampling_settings(generation_config)
    rows = []
    home = model.device
    model.to(device or home)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for first in range(0, n_sequences, batch_size):
                count = min(batch_size, n_sequences - first)
                prompt = torch.full((count, 1), start, dtype=torch.long, device=model.device)
                rows.append(model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=seq_len - 1,
                    min_new_tokens=seq_len - 1, temperature=settings["temperature"], top_k=settings["top_k"],
                    top_p=settings["top_p"], pad_token_id=_pad_token(tokenizer, generation_config),
                ).cpu())
    finally:
        model.to(home)
    input_ids = torch.cat(rows)[:, :seq_len].contiguous()
    generation = {**settings, "start_token": start, "max_new_tokens": seq_len - 1}
    spec = f"{SELF}:{n_sequences}"
    return CalibrationSet(input_ids, spec, text_sources.sha256_text(json.dumps(generation, sort_keys=True)), seed,
                          "generated", {"generation": generation})


def _start_token(tokenizer, generation_config) -> int:
    for candidate in (getattr(generation_config, "bos_token_id", None), tokenizer.bos_token_id,
                      getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    raise EdgeCompressError("self-generated calibration needs a beginning- or end-of-sequence token")


def _pad_token(tokenizer, generation_config) -> int:
    pad = getattr(generation_config, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _start_token(tokenizer, generation_config)
    return int(pad[0] if isinstance(pad, list) else pad)
