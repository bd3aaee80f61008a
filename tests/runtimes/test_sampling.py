"""Next-token choice: greedy, and seeded temperature / top-k / top-p sampling."""

from __future__ import annotations

import numpy as np
import pytest

from edgecompress.runtimes.errors import ArtifactRuntimeError
from edgecompress.runtimes.sampling import SamplingSettings, choose_token

LOGITS = np.array([1.0, 3.0, 2.5, -1.0, 0.0], dtype=np.float32)


def draws(settings: SamplingSettings, n: int = 400) -> list[int]:
    rng = np.random.default_rng(settings.seed)
    return [choose_token(LOGITS, settings, rng) for _ in range(n)]


def test_greedy_is_the_argmax():
    assert choose_token(LOGITS, SamplingSettings(), np.random.default_rng(0)) == 1


def test_the_same_seed_gives_the_same_tokens():
    settings = SamplingSettings(temperature=1.0, seed=7)
    assert draws(settings) == draws(settings)
    assert len(set(draws(settings))) > 2


def test_top_k_and_top_p_restrict_the_candidates():
    assert set(draws(SamplingSettings(temperature=1.0, top_k=2, seed=0))) == {1, 2}
    assert set(draws(SamplingSettings(temperature=1.0, top_k=1, seed=0))) == {1}
    assert set(draws(SamplingSettings(temperature=1.0, top_p=0.01, seed=0))) == {1}
    # softmax mass of token 1 is ≈ 0.53: top-p 0.6 needs the second token too, never the rest.
    assert set(draws(SamplingSettings(temperature=1.0, top_p=0.6, seed=0))) == {1, 2}


@pytest.mark.parametrize("settings", [SamplingSettings(temperature=-1), SamplingSettings(top_k=-2),
                                      SamplingSettings(top_p=0.0), SamplingSettings(top_p=1.5)])
def test_invalid_settings_are_refused(settings):
    with pytest.raises(ArtifactRuntimeError):
        settings.validate()
