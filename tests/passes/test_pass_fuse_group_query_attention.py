"""FuseGroupQueryAttentionPass: MultiHeadAttention over the repeated KV cache → GroupQueryAttention."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

from edgecompress.passes.fuse_group_query_attention import FuseGroupQueryAttentionPass
from edgecompress.passes.fuse_ort_ops import FuseOrtOpsPass
from edgecompress.passes.graph_edits import FUSED_MARK

LAYERS = 3


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


def _mha_model(path) -> ir.Model:
    model = ir.load(path)
    FuseOrtOpsPass()(model)
    return model


def test_attention_reads_the_cache_once_per_kv_head(exported_llama, decoder_parity):
    model = _mha_model(exported_llama[1])
    before = _ops(model)
    assert before["MultiHeadAttention"] == LAYERS and before["Expand"] >= 2 * LAYERS

    fuse = FuseGroupQueryAttentionPass()
    fuse_result = fuse(model)
    assert fuse_result.modified

    after = _ops(model)
    assert fuse_result.stats.fused == LAYERS and not fuse_result.stats.skipped
    assert after["GroupQueryAttention"] == LAYERS and after["MultiHeadAttention"] == 0
    # The repeat_kv copies (one Expand per cache per layer) are gone; one Expand builds seqlens_k.
    assert after["Expand"] == before["Expand"] - 2 * LAYERS + 1
    for index in range(LAYERS):  # every present output now comes straight from the fused op
        for kind, slot in (("key", 1), ("value", 2)):
            output = next(v for v in model.graph.outputs if v.name == f"present.{index}.{kind}")
            producer = output.producer()
            assert producer.op_type == "GroupQueryAttention" and producer.outputs[slot] is output
            assert producer.attributes.get_int("kv_num_heads") == 2 and producer.attributes.get_int("num_heads") == 4


def test_outputs_unchanged_with_a_cache_and_with_left_padding(exported_llama, decoder_parity):
    reference = _mha_model(exported_llama[1])
    fused = _mha_model(exported_llama[1])
    FuseGroupQueryAttentionPass()(fused)

    feeds = decoder_parity.feeds(num_layers=LAYERS)  # batch 2, 3 new tokens over 4 cached
    # onnxruntime's GroupQueryAttention refuses several new tokens over a cache in a batch > 1 (see the
    # pass's limitations); one row continues a prompt, and a batch of 2 decodes one token each.
    continuation = {name: value[:1] for name, value in feeds.items()}
    decode = {name: value[:, -1:] if name in ("input_ids", "position_ids") else value for name, value in feeds.items()}
    decode["attention_mask"] = feeds["attention_mask"][:, :5]
    for step in (continuation, decode):
        decoder_parity.assert_close(decoder_parity.onnx(fused, step), decoder_parity.onnx(reference, step), atol=1e-5)

    prefill = decoder_parity.feeds(num_layers=LAYERS)
    for name in list(prefill):
        if name.startswith("past_key_values."):
            prefill[name] = prefill[name][:, :, :0]
    prefill["attention_mask"] = np.ones((2, 3), np.int64)
    prefill["attention_mask"][1, :2] = 0  # row 1 is left-padded: one real token
    prefill["position_ids"] = np.asarray([[0, 1, 2], [0, 0, 0]], np.int64)
    got, want = decoder_parity.onnx(fused, prefill), decoder_parity.onnx(reference, prefill)
    np.testing.assert_allclose(got["logits"][0], want["logits"][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["logits"][1, 2], want["logits"][1, 2], atol=1e-5, rtol=0)


def test_unfused_graph_is_refused_and_left_alone(exported_llama):
    model = ir.load(exported_llama[1])  # no MultiHeadAttention yet: nothing to rewrite
    nodes = len(model.graph)
    fuse = FuseGroupQueryAttentionPass()
    with pytest.raises(ir.passes.PreconditionError, match="after FuseOrtOpsPass"):
        fuse(model)
    assert len(model.graph) == nodes
    # Marked as fused but without MultiHeadAttention (the SDPA rules did not match): a no-op.
    model.metadata_props[FUSED_MARK] = "1"
    fuse_result = fuse(model)
    assert not fuse_result.modified
    assert fuse_result.stats.fused == 0 and len(model.graph) == nodes


def _rotary_fused(exported):
    from edgecompress.export import rotary_caches

    model = _mha_model(exported[1])
    caches = rotary_caches(exported[0])
    return model, caches, FuseGroupQueryAttentionPass(rotary=caches)(model)


def test_rotary_moves_inside_the_op(exported_llama_head16):
    before = _ops(_mha_model(exported_llama_head16[1]))
    model, caches, result = _rotary_fused(exported_llama_head16)
    from edgecompress.export import MIN_ROTARY_POSITIONS

    assert exported_llama_head16[0].config.max_position_embeddings < MIN_ROTARY_POSITIONS
    assert caches is not None and caches.cos.shape == (MIN_ROTARY_POSITIONS, 8)
    assert result.stats.fused == LAYERS and result.stats.rotary_inside == LAYERS and not result.stats.rotary_outside
    after = _ops(model)
    assert after["Neg"] == 0 and after["Cos"] == 0 and after["Sin"] == 0  # every rotary op and its cos/sin are gone
    assert after["Slice"] < before["Slice"] and after["Transpose"] < before["Transpose"]
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":
            assert node.attributes.get_int("do_rotary") == 1
            assert node.inputs[7].name == "gqa_cos_cache" and node.inputs[8].name == "gqa_sin_cache"
            # q and k arrive unrotated, straight from their projections (BSH)
            assert {node.inputs[0].producer().op_type, node.inputs[1].producer().op_type} <= {"MatMul", "Add"}
    np.testing.assert_array_equal(model.graph.initializers["gqa_cos_cache"].const_value.numpy(), caches.cos)


def test_rotary_inside_keeps_the_outputs(exported_llama_head16, decoder_parity):
    reference = _mha_model(exported_llama_head16[1])
    fused, _, _ = _rotary_fused(exported_llama_head16)
    feeds = decoder_parity.feeds(num_layers=LAYERS, head_dim=16)  # positions 4..6 after 4 cached: the kernel's
    continuation = {name: value[:1] for name, value in feeds.items()}
    decode = {name: value[:, -1:] if name in ("input_ids", "position_ids") else value for name, value in feeds.items()}
    decode["attention_mask"] = feeds["attention_mask"][:, :5]
    decode["position_ids"] = np.full((2, 1), 4, np.int64)
    for step in (continuation, decode):
        decoder_parity.assert_close(decoder_parity.onnx(fused, step), decoder_parity.onnx(reference, step), atol=1e-5)
    # A left-padded row is rotated at positions shifted by its padding, queries and keys alike: same scores.
    prefill = {name: value[:, :, :0] if name.startswith("past_key_values.") else value for name, value in feeds.items()}
    prefill["attention_mask"] = np.ones((2, 3), np.int64)
    prefill["attention_mask"][1, :2] = 0
    prefill["position_ids"] = np.asarray([[0, 1, 2], [1, 1, 0]], np.int64)  # Hugging Face's, for left padding
    got, want = decoder_parity.onnx(fused, prefill), decoder_parity.onnx(reference, prefill)
    np.testing.assert_allclose(got["logits"][0], want["logits"][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["logits"][1, 2], want["logits"][1, 2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("head16", [True, False])
def test_rotary_the_kernel_cannot_take_stays_outside(exported_llama, exported_llama_head16, head16):
    from edgecompress.export import rotary_caches
    from edgecompress.passes.fuse_group_query_attention import RotaryCaches

    exported = exported_llama_head16 if head16 else exported_llama
    model = _mha_model(exported[1])
    caches = RotaryCaches(np.ones((16, 4), np.float32), np.zeros((16, 4), np.float32)) if head16 else \
        rotary_caches(exported[0])
    result = FuseGroupQueryAttentionPass(rotary=caches)(model)
    assert result.stats.fused == LAYERS and result.stats.rotary_inside == 0
    assert list(result.stats.rotary_outside.values()) == [LAYERS]
    reason = next(iter(result.stats.rotary_outside))
    assert ("the caches hold 8" if head16 else "not a multiple of 16") in reason
    assert all(node.attributes.get_int("do_rotary") == 0 for node in model.graph if node.op_type == "GroupQueryAttention")
