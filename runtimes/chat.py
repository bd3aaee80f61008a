"""The artifact's chat template (chat_template.jinja), rendered with jinja2 the way Hugging Face does."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from edgecompress.contract import CHAT_TEMPLATE_FILE
from edgecompress.runtimes.errors import ArtifactRuntimeError

ROLES = ("system", "user", "assistant", "tool")
_SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")


def special_tokens(tokenizer_config: dict) -> dict[str, str]:
    """The named special tokens as strings (tokenizer_config may store them as {"content": ...})."""
    tokens = {}
    for name in _SPECIAL_TOKENS:
        value = tokenizer_config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _raise_exception(message):
    raise ArtifactRuntimeError(f"chat template: {message}")


class ChatTemplate:
    def __init__(self, source: str, tokens: dict[str, str]):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # Hugging Face's settings: trimmed blocks, a sandbox, and the helpers templates expect.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except TemplateError as exc:
            raise ArtifactRuntimeError(f"the chat template does not parse: {exc}") from None
        self.tokens = tokens

    @classmethod
    def from_folder(cls, folder: Path, tokenizer_config: dict) -> "ChatTemplate":
        path = folder / CHAT_TEMPLATE_FILE
        if path.is_file():
            source = path.read_text(encoding="utf-8")
        elif isinstance(tokenizer_config.get("chat_template"), str):
            source = tokenizer_config["chat_template"]
        else:
            raise ArtifactRuntimeError(f"'{folder}' has no {CHAT_TEMPLATE_FILE}: this model has no chat format")
        return cls(source, special_tokens(tokenizer_config))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        for message in messages:
            role = message.get("role")
            if role not in ROLES:
                raise ArtifactRuntimeError(f"unknown chat role '{role}' (expected one of: {', '.join(ROLES)})")
            if not isinstance(message.get("content"), str):
                raise ArtifactRuntimeError(f"chat message of role '{role}' has no text content")
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens)
        except TemplateError as exc:
            raise ArtifactRuntimeError(f"the chat template failed to render: {exc}") from None
