"""Calibration sets from text files, the shared WikiText-2 files and local HF dataset folders."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from edgecompress.calibrate import (  # noqa: E402
    build_calibration,
    default_wikitext_dir,
    parse_hf_spec,
    windows_from_tokens,
)
from edgecompress.errors import EdgeCompressError  # noqa: E402

WORDS = "the a of and to in is was on for with as by at from it an be this that".split()


def word_tokenizer():
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def corpus(n_words=400):
    return " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(n_words))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(corpus())
    return path


def test_text_file_windows_from_start(text_file):
    tokenizer = word_tokenizer()
    calib = build_calibration(text_file, tokenizer, n_sequences=3, seq_len=50)
    tokens = tokenizer(corpus(), add_special_tokens=False)["input_ids"]
    assert calib.input_ids.dtype == torch.int64
    assert calib.input_ids.shape == (3, 50)
    assert calib.input_ids.flatten().tolist() == tokens[:150]
    assert calib.source == str(text_file) and len(calib.source_sha256) == 64
    assert calib.describe()["sampling"] == "start"


def test_random_windows_are_deterministic_by_seed():
    tokens = list(range(1000))
    first = windows_from_tokens(tokens, 4, 32, sampling="random", seed=1)
    again = windows_from_tokens(tokens, 4, 32, sampling="random", seed=1)
    other = windows_from_tokens(tokens, 4, 32, sampling="random", seed=2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    for row in first:  # each window is a contiguous slice of the stream
        assert row.tolist() == list(range(int(row[0]), int(row[0]) + 32))


def test_content_hash_depends_on_tokens(text_file):
    tokenizer = word_tokenizer()
    a = build_calibration(text_file, tokenizer, n_sequences=2, seq_len=40)
    b = build_calibration(text_file, tokenizer, n_sequences=2, seq_len=40)
    c = build_calibration(text_file, tokenizer, n_sequences=2, seq_len=40, sampling="random", seed=3)
    assert a.content_hash() == b.content_hash() != c.content_hash()


def test_text_shorter_than_one_sequence_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("the a of")
    with pytest.raises(EdgeCompressError, match="shorter than one sequence"):
        build_calibration(path, word_tokenizer(), n_sequences=1, seq_len=16)


def test_too_few_sequences_from_start_is_refused(text_file):
    with pytest.raises(EdgeCompressError, match="sequences"):
        build_calibration(text_file, word_tokenizer(), n_sequences=20, seq_len=50)


def test_wikitext_test_split_is_refused(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(corpus())
    with pytest.raises(EdgeCompressError, match="evaluation"):
        build_calibration(path, word_tokenizer(), n_sequences=1, seq_len=8)
    shared_test = default_wikitext_dir() / "wiki.test.raw"
    if shared_test.is_file():
        with pytest.raises(EdgeCompressError, match="evaluation"):
            build_calibration(shared_test, word_tokenizer(), n_sequences=1, seq_len=8)
    with pytest.raises(EdgeCompressError, match="evaluation"):
        build_calibration("hf:wikitext:wikitext-2-raw-v1:test", word_tokenizer(), n_sequences=1, seq_len=8)


def test_wikitext_alias_reads_the_validation_file(tmp_path, monkeypatch):
    (tmp_path / "wiki.valid.tokens").write_text(corpus())
    monkeypatch.setenv("EDGECOMPRESS_WIKITEXT_DIR", str(tmp_path))
    calib = build_calibration("wikitext-2", word_tokenizer(), n_sequences=2, seq_len=30)
    assert calib.source.endswith("wiki.valid.tokens") and calib.input_ids.shape == (2, 30)


def test_shared_wikitext_dir_is_found():
    if not default_wikitext_dir().exists():
        pytest.skip("no shared data folder on this machine")
    assert (default_wikitext_dir() / "wiki.valid.tokens").is_file()


def test_parse_hf_spec():
    assert parse_hf_spec("hf:wikitext:wikitext-2-raw-v1:validation") == {
        "name": "wikitext", "config": "wikitext-2-raw-v1", "split": "validation", "column": "text"}
    assert parse_hf_spec("hf:wikitext:wikitext-2-raw-v1:validation[:100]:content")["split"] == "validation[:100]"
    assert parse_hf_spec("hf:/data/set:train") == {
        "name": "/data/set", "config": None, "split": "train", "column": "text"}
    with pytest.raises(EdgeCompressError):
        parse_hf_spec("hf:onlyname")


def test_local_hf_dataset_folder(tmp_path):
    folder = tmp_path / "tiny_dataset"
    folder.mkdir()
    rows = [{"text": corpus(60)}, {"text": ""}, {"text": corpus(80)}]
    with open(folder / "validation.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    with open(folder / "train.jsonl", "w") as handle:
        handle.write(json.dumps({"text": "the a"}) + "\n")
    tokenizer = word_tokenizer()
    calib = build_calibration(f"hf:{folder}::validation:text", tokenizer, n_sequences=2, seq_len=50)
    joined = "\n\n".join(row["text"] for row in rows)
    expected = tokenizer(joined, add_special_tokens=False)["input_ids"][:100]
    assert calib.input_ids.flatten().tolist() == expected
    sliced = build_calibration(f"hf:{folder}:validation[:1]", tokenizer, n_sequences=1, seq_len=50)
    assert sliced.input_ids.shape == (1, 50)
    with pytest.raises(EdgeCompressError, match="column"):
        build_calibration(f"hf:{folder}::validation:body", tokenizer, n_sequences=1, seq_len=8)
    with pytest.raises(EdgeCompressError, match="cannot load"):
        build_calibration(f"hf:{tmp_path / 'missing'}:validation", tokenizer, n_sequences=1, seq_len=8)
