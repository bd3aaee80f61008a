"""Calibration sets from text files, $EDGECOMPRESS_DATA, local HF dataset folders and self-generated text."""

import json
import os

import pytest
import torch

from edgecompress.calibrate import build_calibration, windows_from_tokens
from edgecompress.errors import EdgeCompressError
from edgecompress.runtimes.text_sources import DATA_ENV, parse_hf_spec
from tests import helpers

WORDS = "the a of and to in is was on for with as by at from it an be this that".split()


def word_tokenizer():
    return helpers.word_tokenizer(WORDS)


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
    with pytest.raises(EdgeCompressError, match="evaluation"):
        build_calibration("hf:wikitext:wikitext-2-raw-v1:test", word_tokenizer(), n_sequences=1, seq_len=8)


def test_wikitext_test_split_is_refused_by_content(tmp_path):
    """A renamed copy of the real test split: refused by its sha256 (CI has the file in EDGECOMPRESS_DATA)."""
    folder = os.environ.get(DATA_ENV)
    if not folder or not os.path.isfile(os.path.join(folder, "wiki.test.raw")):
        pytest.skip(f"{DATA_ENV} is unset: the real WikiText-2 test split is not on this machine")
    renamed = tmp_path / "renamed.txt"
    renamed.write_bytes(open(os.path.join(folder, "wiki.test.raw"), "rb").read())
    with pytest.raises(EdgeCompressError, match="evaluation"):
        build_calibration(renamed, word_tokenizer(), n_sequences=1, seq_len=8)


def test_edgecompress_data_is_the_default_source(tmp_path, monkeypatch):
    (tmp_path / "wiki.valid.tokens").write_text(corpus())
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    calib = build_calibration(None, word_tokenizer(), n_sequences=2, seq_len=30)
    assert calib.source == str(tmp_path / "wiki.valid.tokens") and calib.input_ids.shape == (2, 30)
    assert calib.input_ids.flatten().tolist() == word_tokenizer()(corpus(), add_special_tokens=False)["input_ids"][:60]


def test_edgecompress_data_without_the_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(EdgeCompressError, match="has no wiki.valid.tokens"):
        build_calibration(None, word_tokenizer(), n_sequences=1, seq_len=8)


def test_a_seed_draws_random_windows(text_file):
    tokenizer = word_tokenizer()
    start = build_calibration(text_file, tokenizer, n_sequences=3, seq_len=20)
    seeded = build_calibration(text_file, tokenizer, n_sequences=3, seq_len=20, seed=7)
    again = build_calibration(text_file, tokenizer, n_sequences=3, seq_len=20, seed=7)
    assert start.sampling == "start" and seeded.sampling == "random" and seeded.seed == 7
    assert torch.equal(seeded.input_ids, again.input_ids) and not torch.equal(seeded.input_ids, start.input_ids)
    assert seeded.content_hash() != start.content_hash()


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


@pytest.mark.parametrize("spec", ["self:0", "self:x", "self:", "self:-2"])
def test_bad_self_specs_are_refused(spec):
    with pytest.raises(EdgeCompressError, match="self:N"):
        build_calibration(spec, word_tokenizer(), n_sequences=1, seq_len=8)


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir), GenerationConfig.from_pretrained(tiny_llama_dir)


def test_self_generated_text_is_full_length_and_reproducible(tiny_model_and_tokenizer):
    model, tokenizer, generation = tiny_model_and_tokenizer
    kwargs = dict(model=model, generation_config=generation)
    calib = build_calibration("self:3", tokenizer, n_sequences=99, seq_len=24, **kwargs)
    again = build_calibration("self:3", tokenizer, n_sequences=99, seq_len=24, **kwargs)
    other = build_calibration("self:3", tokenizer, n_sequences=99, seq_len=24, seed=1, **kwargs)
    assert calib.input_ids.shape == (3, 24) and calib.source == "self:3" and calib.seed == 0
    assert (calib.input_ids[:, 0] == generation.bos_token_id).all()
    assert torch.equal(calib.input_ids, again.input_ids) and calib.content_hash() == again.content_hash()
    assert not torch.equal(calib.input_ids, other.input_ids) and calib.content_hash() != other.content_hash()
    described = calib.describe()
    assert described["generation"]["temperature"] == 1.0 and described["sampling"] == "generated"
    assert build_calibration("self", tokenizer, n_sequences=2, seq_len=8, **kwargs).n_sequences == 2


def test_no_text_anywhere_falls_back_to_self_with_a_warning(tiny_model_and_tokenizer, monkeypatch):
    model, tokenizer, generation = tiny_model_and_tokenizer
    monkeypatch.delenv(DATA_ENV, raising=False)  # and the datasets library is offline (tests/conftest.py)
    warnings = []
    calib = build_calibration(None, tokenizer, n_sequences=2, seq_len=16, model=model,
                              generation_config=generation, warn=warnings.append)
    assert calib.source == "self:2" and calib.input_ids.shape == (2, 16)
    assert len(warnings) == 1 and "self-generated" in warnings[0] and DATA_ENV in warnings[0]
    assert calib.describe()["fallback"] == warnings[0]
