"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgecompress.runtimes.errors import ArtifactRuntimeError


@dataclass
class SamplingSettings:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0  # 1 means no nucleus cut
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise ArtifactRuntimeError("--temperature must be ≥ 0 (0 is greedy)")
        if self.top_k < 0:
            raise ArtifactRuntimeError("--top-k must be ≥ 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise ArtifactRuntimeError("--top-p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def choose_token(logits: np.ndarray, settings: SamplingSettings, rng: np.random.Generator) -> int:
    if settings.greedy:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / settings.temperature
    if 0 < settings.top_k < scores.size:
        kth = np.partition(scores, -settings.top_k)[-settings.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if settings.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        cut = order[mass_before >= settings.top_p]  # the most likely token always stays
        probs[cut] = 0.0
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
