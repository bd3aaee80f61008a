"""End-to-end builds on tiny random models: the artifact, its I/O contract and its verification."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgecompress import api
from edgecompress.errors import EdgeCompressError

EXPECTED_FILES = {
    "model.onnx",
    "model.onnx.data",
    "genai_config.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "report.json",
}


def test_artifact_holds_every_file_and_a_passing_report(tiny_llama_artifact):
    out, report = tiny_llama_artifact
    assert EXPECTED_FILES <= {p.name for p in out.iterdir()}
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["verification"]["passed"] is True
    assert on_disk["verification"]["greedy"]["identical"] is True
    assert len(on_disk["verification"]["greedy"]["onnxruntime"]) == 16
    checks = {c["check"].split(" (")[0]: c for c in on_disk["verification"]["checks"]}
    for name in ("prefill logits", "decode logits", "padded batch prefill logits"):
        assert checks[name]["passed"] and checks[name]["max_abs_diff"] <= checks[name]["bound"]
    # Every file but the report is in the manifest with its real hash.
    assert set(on_disk["manifest"]) == EXPECTED_FILES - {"report.json"}
    assert report["path"] == str(out.absolute()) or report["path"] == str(out)


def test_graph_io_contract(tiny_llama_artifact):
    out, _ = tiny_llama_artifact
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    outputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output}
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert inputs["position_ids"] == ["batch_size", "sequence_length"]
    for i in range(3):
        assert inputs[f"past_key_values.{i}.key"] == ["batch_size", 2, "past_sequence_length", 16]
        assert inputs[f"past_key_values.{i}.value"] == ["batch_size", 2, "past_sequence_length", 16]
        assert outputs[f"present.{i}.key"] == ["batch_size", 2, "total_sequence_length", 16]
    # logits_to_keep (default 0: every position) sets how many positions get logits
    assert outputs["logits"] == ["batch_size", "logits_sequence_length", 64]
    assert "logits_to_keep" in inputs and inputs["logits_to_keep"] == []
    assert "logits_to_keep" in {t.name for t in model.graph.initializer}  # its default, so it is optional
    # External data: every weight of any size lives in model.onnx.data, not in the protobuf.
    weights = [t for t in model.graph.initializer if np.prod(t.dims) >= 1024]
    assert weights and all(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    assert {e.value for t in weights for e in t.external_data if e.key == "location"} == {"model.onnx.data"}


def test_genai_config_matches_the_graph(tiny_llama_artifact):
    out, _ = tiny_llama_artifact
    config = json.loads((out / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "llama"
    assert decoder["num_hidden_layers"] == 3 and decoder["num_key_value_heads"] == 2 and decoder["head_size"] == 16
    assert decoder["inputs"]["past_key_names"] % 0 == "past_key_values.0.key"
    assert decoder["outputs"]["present_value_names"] % 2 == "present.2.value"
    assert config["search"]["do_sample"] is False and config["search"]["top_k"] == 1


def test_dynamic_batch_sequence_and_past(tiny_llama_artifact, tiny_llama_dir):
    """The export must run at shapes other than the tracing ones, past length 0 and batch 1 included."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgecompress.runtimes.decoder import OrtDecoder
    from edgecompress.verify import TorchReference

    out, _ = tiny_llama_artifact
    decoder = OrtDecoder(out)
    reference = TorchReference(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval())
    rng = np.random.default_rng(0)
    for batch, seq, past in [(1, 1, 0), (1, 7, 0), (3, 2, 5), (1, 1, 11)]:
        ids = rng.integers(0, 64, (batch, seq))
        mask = np.ones((batch, past + seq), np.int64)
        pos = np.tile(np.arange(past, past + seq), (batch, 1))
        kv = [rng.standard_normal((batch, 2, past, 16)).astype(np.float32) for _ in range(6)]
        ours, present = decoder.forward(ids, mask, pos, kv)
        ref, ref_present = reference.forward(ids, mask, pos, kv)
        np.testing.assert_allclose(ours, ref, atol=1e-4)
        assert present[0].shape == (batch, 2, past + seq, 16)
        np.testing.assert_allclose(present[5], ref_present[5], atol=1e-5)


def test_qwen2_with_qkv_bias_builds_and_verifies(tiny_qwen2_dir, tmp_path):
    report = api.build(str(tiny_qwen2_dir), "cpu-x86", tmp_path / "qwen")
    assert report["verification"]["passed"] and report["verification"]["greedy"]["identical"]
    assert json.loads((tmp_path / "qwen" / "genai_config.json").read_text())["model"]["type"] == "qwen2"


def test_mistral_builds_and_verifies(tmp_path):
    from tests.tiny_models import save_tiny_model

    folder = save_tiny_model(tmp_path / "mistral", "mistral", layers=2)
    report = api.build(str(folder), None, tmp_path / "out")
    assert report["verification"]["passed"] and report["model"]["model_type"] == "mistral"


def test_existing_output_is_refused_and_force_replaces_it(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EdgeCompressError, match="already exists"):
        api.build(str(tiny_llama_dir), "cpu-x86", out)
    assert (out / "keep.txt").read_text() == "mine"
    api.build(str(tiny_llama_dir), "cpu-x86", out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or retired folders left


def test_failed_build_leaves_nothing_behind(tiny_llama_dir, tmp_path, monkeypatch):
    from edgecompress import verify
    from edgecompress.errors import VerificationError

    def broken(*args, **kwargs):
        raise VerificationError("verification failed: simulated")

    monkeypatch.setattr(verify, "verify", broken)
    with pytest.raises(VerificationError):
        api.build(str(tiny_llama_dir), "cpu-x86", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_build_leaves_nothing_behind(tiny_llama_dir, tmp_path, monkeypatch):
    from edgecompress import export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_sidecar_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        api.build(str(tiny_llama_dir), "cpu-x86", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_inspect_describes_the_artifact(tiny_llama_artifact):
    out, report = tiny_llama_artifact
    info = api.inspect(out)
    assert info["layers"] == 3
    assert info["parameters"] > 0 and info["nodes"] > 0
    assert info["opset"]["ai.onnx"] >= 18
    assert info["custom_ops"] == []
    assert [v["name"] for v in info["inputs"]][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert info["build"]["verification_passed"] is True
    assert info["build"]["source"]["kind"] == "hf_dir"


def test_inspect_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(EdgeCompressError, match="not an edgecompress artifact"):
        api.inspect(tmp_path)
