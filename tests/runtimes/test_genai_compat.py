"""The artifact folder runs unchanged in onnxruntime-genai and gives our runtime's greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest

from edgecompress.runtimes.generate import TextGenerator
from edgecompress.runtimes.kv_steps import NumpySteps
from tests.runtimes.genai_reference import genai_greedy, without_eos

pytest.importorskip("onnxruntime_genai")

PROMPTS = ["why is the sky blue", "cat sat on mat", "dog ran far away from home"]


@pytest.fixture(scope="module")
def generator(tiny_llama_artifact):
    return TextGenerator(tiny_llama_artifact[0])


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_greedy_tokens_as_onnxruntime_genai(generator, tiny_llama_artifact, prompt, chat):
    # onnxruntime-genai's tokenizer does not read the tiny word-level tokenizer; both get the same ids.
    ids = generator.encode(prompt, chat=chat)
    ours = generator.stream_tokens(ids, 16)
    theirs, _ = genai_greedy(tiny_llama_artifact[0], ids, 16)
    assert without_eos(list(ours), generator.eos_ids) == theirs


def test_same_prefill_logits_as_onnxruntime_genai(generator, tiny_llama_artifact):
    ids = generator.encode(PROMPTS[0], chat=True)
    _, logits = genai_greedy(tiny_llama_artifact[0], ids, 1)
    np.testing.assert_allclose(logits[0, -1], NumpySteps(generator.decoder)(ids), atol=1e-4)
