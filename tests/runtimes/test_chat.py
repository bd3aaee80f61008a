"""The chat template renders as Hugging Face renders it, with the tokenizer_config special tokens."""

from __future__ import annotations

import pytest

from edgecompress.runtimes.chat import ChatTemplate, special_tokens
from edgecompress.runtimes.errors import ArtifactRuntimeError

# SmolLM2's template (system default, role headers) plus a use of the bos/eos names.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "user", "content": "why is the sky blue?"},
    {"role": "assistant", "content": "air scatters light."},
    {"role": "user", "content": "and the sea?"},
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(add_generation_prompt):
    from tests.tiny_models import make_tokenizer

    hf = make_tokenizer()
    expected = hf.apply_chat_template(
        MESSAGES, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    tokens = special_tokens({"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"})
    ours = ChatTemplate(TEMPLATE, tokens).render(MESSAGES, add_generation_prompt=add_generation_prompt)
    assert ours == expected


def test_unknown_role_is_refused():
    with pytest.raises(ArtifactRuntimeError, match="unknown chat role 'wizard'"):
        ChatTemplate(TEMPLATE, {}).render([{"role": "wizard", "content": "hi"}])


def test_raise_exception_in_a_template_is_a_clear_error():
    template = ChatTemplate("{{ raise_exception('only user turns') }}", {})
    with pytest.raises(ArtifactRuntimeError, match="only user turns"):
        template.render([{"role": "user", "content": "hi"}])
