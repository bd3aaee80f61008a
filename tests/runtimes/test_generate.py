"""Generation from an artifact: greedy parity with the decoder loop, streaming, chat, IO binding, errors."""

from __future__ import annotations

import json

import pytest

from edgecompress import api
from edgecompress.errors import EdgeCompressError
from edgecompress.runtimes.decoder import OrtDecoder
from edgecompress.runtimes.generate import TextGenerator
from edgecompress.runtimes.sampling import SamplingSettings
from tests.helpers import run_cli

PROMPT = "why is the sky blue"


@pytest.fixture(scope="module")
def generator(tiny_llama_artifact):
    return TextGenerator(tiny_llama_artifact[0])


def test_greedy_tokens_match_the_decoder_loop(generator, tiny_llama_artifact):
    ids = generator.encode(PROMPT)
    expected = OrtDecoder(tiny_llama_artifact[0]).greedy(ids, 12, generator.eos_ids)
    assert generator.generate(PROMPT, 12).tokens == expected


def test_prefill_asks_for_the_last_position_only(tiny_llama_artifact):
    """The artifact's logits_to_keep input: the decoder loop feeds 1, and gets the last row of the full logits."""
    import numpy as np

    decoder = OrtDecoder(tiny_llama_artifact[0])
    assert list(decoder.last_only) == ["logits_to_keep"] and int(decoder.last_only["logits_to_keep"]) == 1
    ids = np.asarray([[5, 9, 3, 7, 11]], dtype=np.int64)
    mask, positions = np.ones_like(ids), np.arange(5, dtype=np.int64)[None, :]
    full, full_past = decoder.forward(ids, mask, positions, decoder.empty_cache(1))
    last, last_past = decoder.forward(ids, mask, positions, decoder.empty_cache(1), last_only=True)
    assert full.shape[1] == 5 and last.shape[1] == 1
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-5, rtol=0)
    for a, b in zip(full_past, last_past):  # the cache is the same whichever logits are kept
        np.testing.assert_array_equal(a, b)


def test_io_binding_gives_the_same_tokens(tiny_llama_artifact):
    plain = TextGenerator(tiny_llama_artifact[0], io_binding=False).generate(PROMPT, 10)
    bound = TextGenerator(tiny_llama_artifact[0], io_binding=True).generate(PROMPT, 10)
    assert bound.tokens == plain.tokens


def test_streamed_pieces_make_the_text(generator):
    pieces = []
    result = generator.generate(PROMPT, 10, on_text=pieces.append)
    visible = [t for t in result.tokens if t not in generator.eos_ids]
    assert "".join(pieces) == result.text == generator.tokenizer.decode(visible)
    assert result.stopped in ("eos", "max_new_tokens") and len(result.tokens) <= 10


def test_chat_prompt_uses_the_template_like_transformers(generator, tiny_llama_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_llama_dir)
    messages = [{"role": "system", "content": "see sea"}, {"role": "user", "content": PROMPT}]
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = hf(text, add_special_tokens=False)["input_ids"]
    assert generator.encode(PROMPT, chat=True, system="see sea") == expected


def test_sampling_is_reproducible_with_a_seed(generator):
    settings = SamplingSettings(temperature=1.5, top_k=20, top_p=0.95, seed=3)
    first = generator.generate(PROMPT, 8, settings).tokens
    again = generator.generate(PROMPT, 8, SamplingSettings(temperature=1.5, top_k=20, top_p=0.95, seed=3)).tokens
    assert first == again


def test_empty_prompt_and_zero_tokens_do_not_crash(tiny_llama_artifact):
    folder = tiny_llama_artifact[0]
    assert api.generate(folder, "", max_new_tokens=4)["tokens"]  # starts from the bos token
    assert api.generate(folder, PROMPT, max_new_tokens=0)["tokens"] == []
    assert api.generate(folder, "", max_new_tokens=0, chat=True)["tokens"] == []


def test_generation_stops_at_the_context_length(generator):
    prompt = " ".join(["sky"] * (generator.context_length - 3))
    result = generator.generate(prompt, 50)
    assert result.prompt_tokens + len(result.tokens) <= generator.context_length
    assert result.stopped in ("context", "eos")


def test_prompt_longer_than_the_context_is_refused(tiny_llama_artifact):
    long_prompt = " ".join(["sky"] * 300)  # the tiny model's context is 256 tokens
    with pytest.raises(EdgeCompressError, match="context is 256 tokens"):
        api.generate(tiny_llama_artifact[0], long_prompt, max_new_tokens=2)


def test_unknown_chat_role_is_refused(tiny_llama_artifact):
    with pytest.raises(EdgeCompressError, match="unknown chat role"):
        api.generate(tiny_llama_artifact[0], messages=[{"role": "robot", "content": "hi"}], max_new_tokens=2)


def test_missing_file_is_refused(artifact_copy):
    (artifact_copy / "tokenizer.json").unlink()
    with pytest.raises(EdgeCompressError, match="'tokenizer.json' is missing"):
        api.generate(artifact_copy, PROMPT, max_new_tokens=2)


def test_corrupted_file_is_refused(artifact_copy):
    data = artifact_copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different content
    data.write_bytes(bytes(raw))
    with pytest.raises(EdgeCompressError, match="sha256"):
        api.generate(artifact_copy, PROMPT, max_new_tokens=2)


def test_cli_streams_text_and_reports_on_stderr(tiny_llama_artifact, generator):
    folder = str(tiny_llama_artifact[0])
    result = run_cli("generate", folder, PROMPT, "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == generator.generate(PROMPT, 6).text
    assert "tokens/s" in result.stderr
    for args in (["", "--max-new-tokens", "3"], [PROMPT, "-n", "0", "--chat"]):
        assert run_cli("generate", folder, *args).returncode == 0


def test_cli_errors_are_one_line(artifact_copy):
    (artifact_copy / "genai_config.json").write_text(json.dumps({"model": {}}))  # size no longer matches
    result = run_cli("generate", str(artifact_copy), PROMPT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and "genai_config.json" in result.stderr


def test_cli_sampling_is_reproducible_with_a_seed(tiny_llama_artifact):
    args = ["generate", str(tiny_llama_artifact[0]), PROMPT, "-n", "8", "--top-k", "20", "--seed", "5", "-q"]
    first, again = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout


@pytest.mark.parametrize("verb, options", [
    ("generate", ["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--chat", "--verbose"]),
    ("eval", ["--data", "--limit", "--seq-len", "--json", "--verbose"]),
])
def test_help_lists_the_options(verb, options):
    text = run_cli(verb, "--help").stdout
    for option in options:
        assert option in text


def test_a_model_without_a_kv_cache_is_a_one_line_error(tiny_llama_artifact, tmp_path):
    """A valid ONNX model and manifest, but not a KV-cache decoder: refused with one line, not a traceback."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    from edgecompress.artifact import manifest
    from tests.helpers import assert_one_line_error

    folder = tmp_path / "no-kv"
    folder.mkdir()
    for name in ("genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_artifact[0] / name, folder / name)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    out = helper.make_tensor_value_info("logits", TensorProto.INT64, ["batch_size", "sequence_length"])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "no_kv", [ids], [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(folder / "model.onnx"))
    (folder / "report.json").write_text(json.dumps({"manifest": manifest(folder)}))
    result = run_cli("generate", str(folder), PROMPT)
    assert_one_line_error(result, "has no past_key_values.* inputs")
    assert result.returncode == 2
