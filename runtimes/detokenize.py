"""Incremental detokenization for streaming.

Decoding one token at a time is wrong for byte-level and byte-fallback vocabularies: a multi-byte
character (é, 中, 🙂) spans several tokens, and each alone decodes to U+FFFD. Decoding a lone token also
loses context-dependent spacing (SentencePiece's leading "▁"). So we decode a short window that starts
a few tokens back and emit only the text past what that window already produced, holding text back
while it ends in an incomplete character.
"""

from __future__ import annotations

from tokenizers import Tokenizer

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0  # tokens before this are already emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self.ids.append(int(token))
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        current = self._decode(self.ids[self.prefix_offset :])
        if len(current) <= len(emitted) or current.endswith(_INCOMPLETE):
            return ""  # nothing new yet, or a character still waits for its remaining bytes
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return current[len(emitted) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD, as a full decode would)."""
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        current = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return current[len(emitted) :] if len(current) > len(emitted) else ""
