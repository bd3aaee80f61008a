"""Model resolution and loading: every bad input gets a one-line EdgeCompressError before any work."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgecompress import models
from edgecompress.errors import EdgeCompressError


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_missing_path():
    with pytest.raises(EdgeCompressError, match="does not exist") as exc:
        models.resolve("./no/such/model")
    _one_line(exc)


def test_missing_gguf_file():
    with pytest.raises(EdgeCompressError, match="does not exist"):
        models.resolve("/tmp/definitely-missing-model.gguf")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(EdgeCompressError, match="not a Hugging Face model folder") as exc:
        models.resolve(str(tmp_path))
    _one_line(exc)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(EdgeCompressError, match="llama, mistral, qwen2") as exc:
        models.resolve(str(tmp_path))
    assert "gpt2" in _one_line(exc)


def test_truncated_safetensors(tiny_llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(EdgeCompressError, match="corrupt or truncated safetensors") as exc:
        models.resolve(str(broken))
    _one_line(exc)


def test_garbage_safetensors_header(tiny_llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(EdgeCompressError, match="corrupt or truncated safetensors"):
        models.resolve(str(broken))


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf at all")
    with pytest.raises(EdgeCompressError, match="not a GGUF file"):
        models.resolve(str(fake))


def _write_small_gguf(path):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_truncated_gguf(tmp_path):
    good = tmp_path / "good.gguf"
    _write_small_gguf(good)
    models.resolve(str(good))  # the untouched file passes the header check
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:-64])
    with pytest.raises(EdgeCompressError, match="corrupt or truncated GGUF") as exc:
        models.resolve(str(truncated))
    _one_line(exc)


def test_other_file_types_are_refused(tmp_path):
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(EdgeCompressError, match="not a .gguf"):
        models.resolve(str(other))


def test_hub_id_is_recognised_without_network():
    source = models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct", revision="main")
    assert source.kind == "hub" and source.revision == "main"


def test_default_alias_resolves_to_the_shipped_gguf():
    source = models.resolve(None)
    assert source.kind == "alias" and source.spec == "smollm2-135m"
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_local_folder_loads_fp32_eval(tiny_qwen2_dir):
    loaded = models.load(models.resolve(str(tiny_qwen2_dir)))
    assert loaded.model_type == "qwen2"
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype.is_floating_point
    assert loaded.model.model.layers[0].self_attn.q_proj.bias is not None
    assert loaded.info["num_layers"] == 3
