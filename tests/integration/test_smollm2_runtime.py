"""The real artifact embedded in apps: our runtime and onnxruntime-genai give the same greedy tokens,
and a short perplexity run is in the expected range."""

from __future__ import annotations

import pytest

from edgecompress import api
from edgecompress.runtimes.generate import TextGenerator
from tests.helpers import require_wikitext
from tests.runtimes.genai_reference import genai_greedy, without_eos

pytestmark = pytest.mark.integration

PROMPT = "The three most important inventions of the twentieth century are"


def test_smollm2_runs_the_same_in_onnxruntime_genai_and_our_runtime(smollm2_artifact):
    og = pytest.importorskip("onnxruntime_genai")
    generator = TextGenerator(smollm2_artifact, threads=2)
    for chat in (False, True):
        ids = generator.encode(PROMPT, chat=chat)
        ours = without_eos(generator.generate(PROMPT, 24, chat=chat).tokens, generator.eos_ids)
        theirs, _ = genai_greedy(smollm2_artifact, ids, 24)
        assert ours == theirs and len(ours) >= 8
    # onnxruntime-genai's own tokenizer reads the artifact's tokenizer files to the same ids.
    chat_text = generator.chat_template.render([{"role": "user", "content": PROMPT}])
    og_tokenizer = og.Tokenizer(og.Model(str(smollm2_artifact)))
    assert [int(i) for i in og_tokenizer.encode(chat_text)] == generator.encode(PROMPT, chat=True)


def test_smollm2_perplexity_on_two_wikitext_windows(smollm2_artifact):
    require_wikitext()
    result = api.eval(smollm2_artifact, limit=2, threads=2)
    # The 40-window benchmark value is 28.7; two windows land in the same neighbourhood.
    assert 10 < result["perplexity"] < 60 and result["windows"] == 2


def test_smollm2_examples_give_the_same_greedy_tokens(smollm2_artifact):
    from tests.runtimes.example_apps import build_greedy_binary, chat_example_ids, cpp_greedy, runtime_chat_ids

    generator = TextGenerator(smollm2_artifact, threads=2)
    ids = generator.encode(PROMPT, chat=True)
    expected = list(generator.stream_tokens(ids, 24))
    assert cpp_greedy(build_greedy_binary(), smollm2_artifact, ids, 24) == expected
    prompts = ["What is the capital of France?", "And of Italy?"]
    assert chat_example_ids(smollm2_artifact, prompts, 24) == runtime_chat_ids(generator, prompts, 24)
