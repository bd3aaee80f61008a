"""The examples are built and run, and give our runtime's greedy tokens."""

from __future__ import annotations

import pytest

from edgecompress.runtimes.generate import TextGenerator
from tests.runtimes.example_apps import CHAT_SCRIPT, build_greedy_binary, chat_example_ids, cpp_greedy, runtime_chat_ids

PROMPTS = ["why is the sky blue", "dog ran far away from home"]


@pytest.fixture(scope="module")
def greedy_binary():
    return build_greedy_binary()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_cpp_example_gives_the_same_greedy_tokens(greedy_binary, tiny_llama_artifact, prompt):
    folder = tiny_llama_artifact[0]
    generator = TextGenerator(folder)
    ids = generator.encode(prompt, chat=True)
    assert cpp_greedy(greedy_binary, folder, ids, 12) == list(generator.stream_tokens(ids, 12))


def test_python_chat_example_gives_the_same_greedy_tokens(tiny_llama_artifact):
    folder = tiny_llama_artifact[0]
    assert len(CHAT_SCRIPT.read_text().splitlines()) < 60
    expected = runtime_chat_ids(TextGenerator(folder), PROMPTS, 8)
    assert chat_example_ids(folder, PROMPTS, 8) == expected
