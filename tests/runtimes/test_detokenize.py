"""Streaming text: pieces concatenate to the full decode and never hold half a character."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from edgecompress.runtimes.detokenize import IncrementalDetokenizer

TEXT = "Héllo wörld 中文 🙂 done"


def byte_level_tokenizer() -> Tokenizer:
    """GPT-2 style: every byte is a token, so é is two tokens and 🙂 is four."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def byte_fallback_tokenizer() -> Tokenizer:
    """Llama/SentencePiece style: ASCII letters are tokens, everything else falls back to <0xNN> bytes."""
    vocab = {"<unk>": 0, "▁": 1}
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyzH":
        vocab[ch] = len(vocab)
        vocab["▁" + ch] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tokenizer


@pytest.mark.parametrize("make", [byte_level_tokenizer, byte_fallback_tokenizer])
def test_stream_equals_full_decode_without_broken_characters(make):
    tokenizer = make()
    ids = tokenizer.encode(TEXT).ids
    full = tokenizer.decode(ids)
    assert "\ufffd" not in full and len(ids) > len(TEXT.split())  # multi-byte characters span tokens
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == full
    assert not any("\ufffd" in piece for piece in pieces)
    assert sum(1 for p in pieces if p) > 5  # it really streams


def test_an_unfinished_character_is_flushed_at_the_end():
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode("ok 🙂").ids[:-1]  # cut inside the emoji
    detok = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detok.add(i) for i in ids)
    assert streamed == "ok "
    assert streamed + detok.flush() == tokenizer.decode(ids)
