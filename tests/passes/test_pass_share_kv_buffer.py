"""ShareKvBufferPass: the past length read from attention_mask, so one preallocated buffer can be the cache."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from edgecompress import contract
from edgecompress.passes.fuse_group_query_attention import FuseGroupQueryAttentionPass
from edgecompress.passes.fuse_ort_ops import FuseOrtOpsPass
from edgecompress.passes.share_kv_buffer import ShareKvBufferPass

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 3, 2, 8, 32


def _gqa_model(path, gqa: bool = True) -> ir.Model:
    model = ir.load(path)
    FuseOrtOpsPass()(model)
    if gqa:
        FuseGroupQueryAttentionPass()(model)
    return model


def _past_shape_reads(model: ir.Model) -> list[tuple[int, int | None]]:
    reads = []
    for value in model.graph.inputs:
        for node in value.consumers():
            if contract.PAST_INPUT.match(value.name) and node.op_type == "Shape":
                end = node.attributes.get_int("end") if "end" in node.attributes else None
                reads.append((node.attributes.get_int("start", 0), end))
    return reads


def test_past_length_comes_from_the_mask(exported_llama, decoder_parity):
    reference = _gqa_model(exported_llama[1])
    model = _gqa_model(exported_llama[1])
    assert (2, 3) in _past_shape_reads(model)  # the export reads past_key_values.*'s length
    result = ShareKvBufferPass()(model)
    assert result.modified and result.stats.shared and result.stats.past_length_reads >= 1
    assert (2, 3) not in _past_shape_reads(model)
    assert model.metadata_props[contract.SHARED_KV_BUFFER] == "1"
    # An unshared, growing cache still gives the same outputs.
    feeds = decoder_parity.feeds(num_layers=LAYERS)
    step = {name: value[:1] for name, value in feeds.items()}
    decoder_parity.assert_close(decoder_parity.onnx(model, step), decoder_parity.onnx(reference, step), atol=0)


def _session(model: ir.Model, folder):
    import onnxruntime as ort

    path = folder / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _step_feed(ids: list[int], length: int) -> dict[str, np.ndarray]:
    return {
        contract.INPUT_IDS: np.asarray([ids], np.int64),
        contract.ATTENTION_MASK: np.ones((1, length + len(ids)), np.int64),
        contract.POSITION_IDS: np.arange(length, length + len(ids), dtype=np.int64)[None],
    }


def test_a_shared_buffer_written_in_place_gives_the_growing_caches_logits(exported_llama, tmp_path):
    import onnxruntime as ort

    model = _gqa_model(exported_llama[1])
    ShareKvBufferPass()(model)
    session = _session(model, tmp_path)
    pasts, presents = contract.past_names(LAYERS), contract.present_names(LAYERS)
    steps = [[3, 5, 7, 11], [13], [17], [19, 23]]  # a prompt, two decoded tokens, a two-token continuation

    growing = {name: np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32) for name in pasts}
    hosts = [np.zeros((1, KV_HEADS, 12, HEAD_DIM), np.float32) for _ in pasts]
    buffers = [ort.OrtValue.ortvalue_from_numpy(array) for array in hosts]
    length = 0
    for ids in steps:
        outputs = session.run([contract.LOGITS, *presents], {**_step_feed(ids, length), **growing})
        growing = dict(zip(pasts, outputs[1:]))
        binding = session.io_binding()
        for name, array in _step_feed(ids, length).items():
            binding.bind_cpu_input(name, array)
        for past, present, buffer in zip(pasts, presents, buffers):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        binding.bind_output(contract.LOGITS)
        session.run_with_iobinding(binding)
        length += len(ids)
        np.testing.assert_allclose(binding.get_outputs()[-1].numpy(), outputs[0], atol=1e-6, rtol=0)
        # the buffer holds exactly the growing cache in its first `length` rows, zeros after them
        np.testing.assert_array_equal(hosts[0][:, :, :length], growing[pasts[0]])
        assert not hosts[0][:, :, length:].any()


def test_a_cache_not_written_by_group_query_attention_is_left_alone(exported_llama):
    model = _gqa_model(exported_llama[1], gqa=False)  # presents are Concat outputs: a new buffer every step
    nodes = len(model.graph)
    result = ShareKvBufferPass()(model)
    assert not result.modified and not result.stats.shared
    assert "not written by GroupQueryAttention" in result.stats.refused
    assert len(model.graph) == nodes and contract.SHARED_KV_BUFFER not in model.metadata_props


def test_an_unfused_model_is_refused(exported_llama):
    model = ir.load(exported_llama[1])
    with pytest.raises(ir.passes.PreconditionError, match="after FuseOrtOpsPass"):
        ShareKvBufferPass()(model)
