"""Perplexity through onnxruntime: windows, NLL arithmetic, parity with PyTorch, settings, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from edgecompress import api
from edgecompress.errors import EdgeCompressError
from edgecompress.runtimes.perplexity import next_token_nll, perplexity, token_windows


def test_windows_do_not_overlap_and_drop_the_tail():
    windows = token_windows(list(range(10)), 4)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert token_windows(list(range(10)), 4, limit=1).tolist() == [[0, 1, 2, 3]]
    assert token_windows(list(range(3)), 4).shape == (0, 4)


def test_next_token_nll_matches_a_direct_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 10
    ids = rng.integers(0, 7, size=(2, 5))
    expected = np.zeros((2, 4))
    for b in range(2):
        for t in range(4):
            row = logits[b, t].astype(np.float64)
            expected[b, t] = -(row[ids[b, t + 1]] - np.log(np.exp(row).sum()))
    np.testing.assert_allclose(next_token_nll(logits, ids), expected, rtol=1e-12)


def test_perplexity_matches_pytorch_on_the_same_windows(tiny_llama_artifact, tiny_llama_dir, tiny_text):
    import torch
    from transformers import AutoModelForCausalLM

    folder, _ = tiny_llama_artifact
    result = perplexity(folder, tiny_text, seq_len=32, limit=5)
    assert result["windows"] == 5 and result["tokens_scored"] == 5 * 31

    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(tiny_text.read_text(), add_special_tokens=False).ids
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        losses = [model(torch.from_numpy(w[None]), labels=torch.from_numpy(w[None])).loss.item() for w in token_windows(ids, 32, 5)]
    assert result["perplexity"] == pytest.approx(math.exp(np.mean(losses)), rel=1e-4)
    np.testing.assert_allclose(result["window_nll"], losses, rtol=1e-4)


def test_batching_does_not_change_the_result(tiny_llama_artifact, tiny_text):
    folder, _ = tiny_llama_artifact
    one = perplexity(folder, tiny_text, seq_len=16, limit=6, batch_size=1)
    four = perplexity(folder, tiny_text, seq_len=16, limit=6, batch_size=4)
    assert four["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    assert four["settings"]["batch_size"] == 4


def test_settings_are_recorded(tiny_llama_artifact, tiny_text):
    folder, _ = tiny_llama_artifact
    result = api.eval(folder, tiny_text, limit=2, seq_len=16)
    settings = result["settings"]
    assert settings["data"] == str(tiny_text) and settings["seq_len"] == 16 and settings["limit"] == 2
    assert len(settings["data_sha256"]) == 64
    assert result["windows"] == 2 and result["windows_available"] >= 2


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"seq_len": 100_000}, "fewer than one window"),
        ({"limit": 0}, "--limit"),
        ({"seq_len": 1}, "--seq-len"),
    ],
)
def test_bad_settings_are_one_line_errors(tiny_llama_artifact, tiny_text, kwargs, fragment):
    folder, _ = tiny_llama_artifact
    with pytest.raises(EdgeCompressError, match=fragment):
        api.eval(folder, tiny_text, **kwargs)


def test_missing_data_file_is_an_error(tiny_llama_artifact, tmp_path):
    folder, _ = tiny_llama_artifact
    with pytest.raises(EdgeCompressError, match="does not exist"):
        api.eval(folder, tmp_path / "nope.txt")


def test_cli_eval_prints_json(tiny_llama_artifact, tiny_text):
    folder, _ = tiny_llama_artifact
    report_before = (folder / "report.json").read_bytes()
    result = subprocess.run(
        [sys.executable, "-P", "-m", "edgecompress.cli", "eval", str(folder), "--data", str(tiny_text),
         "--limit", "3", "--seq-len", "16", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["windows"] == 3 and printed["perplexity"] > 1
    assert (folder / "report.json").read_bytes() == report_before  # eval prints; it never edits the artifact


@pytest.fixture(scope="module")
def other_artifact(tmp_path_factory):
    """A different model with the same tokenizer (other random weights): a reference whose perplexity differs."""
    from tests.tiny_models import save_tiny_model

    model = save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-seed1", "llama", seed=1)
    out = tmp_path_factory.mktemp("reference") / "tiny-llama-seed1"
    api.build(str(model), "cpu-x86", out)
    return out


def test_a_reference_with_another_tokenizer_is_refused(tiny_llama_artifact, tiny_qwen2_dir, tiny_text, tmp_path):
    """The qwen2 tokenizer splits the same text differently: no ratio over different token windows."""
    folder, _ = tiny_llama_artifact
    api.build(str(tiny_qwen2_dir), "cpu-x86", tmp_path / "qwen2")
    with pytest.raises(EdgeCompressError, match="different token windows"):
        api.eval(folder, tiny_text, limit=3, seq_len=16, reference=tmp_path / "qwen2")


def test_reference_is_scored_on_the_same_windows(tiny_llama_artifact, other_artifact, tiny_text):
    folder, _ = tiny_llama_artifact
    same = api.eval(folder, tiny_text, limit=3, seq_len=16, reference=folder)
    assert same["ratio_to_reference"] == pytest.approx(1.0) and same["reference"]["perplexity"] == same["perplexity"]
    other = api.eval(folder, tiny_text, limit=3, seq_len=16, reference=other_artifact)
    expected = perplexity(other_artifact, tiny_text, seq_len=16, limit=3)["perplexity"]
    assert other["reference"]["perplexity"] == pytest.approx(expected)
    assert other["ratio_to_reference"] == pytest.approx(other["perplexity"] / expected)


def test_missing_reference_fails_before_scoring(tiny_llama_artifact, tiny_text, tmp_path):
    folder, _ = tiny_llama_artifact
    with pytest.raises(EdgeCompressError, match="not an artifact folder"):
        api.eval(folder, tiny_text, limit=2, seq_len=16, reference=tmp_path / "missing")


def test_eval_without_any_data_names_the_options(tiny_llama_artifact, tmp_path):
    from tests.helpers import assert_one_line_error, environment_without_data, run_cli

    folder, _ = tiny_llama_artifact
    result = run_cli("eval", str(folder), cwd=tmp_path, env=environment_without_data(HF_HOME=str(tmp_path / "hf")))
    assert_one_line_error(result, "no evaluation text")
    assert result.returncode == 2 and "--data" in result.stderr and "EDGECOMPRESS_DATA" in result.stderr


def test_eval_reads_the_data_folder(tiny_llama_artifact, tiny_text, tmp_path, monkeypatch):
    (tmp_path / "wiki.test.raw").write_bytes(tiny_text.read_bytes())
    monkeypatch.setenv("EDGECOMPRESS_DATA", str(tmp_path))
    folder, _ = tiny_llama_artifact
    result = api.eval(folder, limit=2, seq_len=16)
    assert result["settings"]["data"] == str(tmp_path / "wiki.test.raw")
    assert result["settings"]["data_origin"] == "EDGECOMPRESS_DATA"
    assert result["perplexity"] == pytest.approx(api.eval(folder, tiny_text, limit=2, seq_len=16)["perplexity"])
