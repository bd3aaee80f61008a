"""KeepLastLogitsPass: the optional `logits_to_keep` input on a tiny exported Llama: the default keeps every
position (the model behaves as exported), k keeps the last k, and what must run first or once is refused."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgecompress.contract import LOGITS, LOGITS_TO_KEEP
from edgecompress.passes import FuseOrtOpsPass, KeepLastLogitsPass, QuantizeWeightsPass
from edgecompress.passes.layer_map import PassInputError


def _session(model: ir.Model, folder) -> ort.InferenceSession:
    path = folder / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_default_keeps_every_position_and_k_keeps_the_last_k(exported_llama, decoder_parity, tmp_path):
    _, path = exported_llama
    feeds = decoder_parity.feeds(3)
    dense = decoder_parity.onnx(ir.load(path), feeds)[LOGITS]  # [2, 3, vocab]
    model = ir.load(path)
    result = KeepLastLogitsPass()(model)
    assert result.modified and result.stats.input_added == LOGITS_TO_KEEP
    session = _session(result.model, tmp_path)
    # not a required input: callers that do not know it (onnxruntime-genai, perplexity) feed nothing
    assert LOGITS_TO_KEEP not in [value.name for value in session.get_inputs()]
    assert LOGITS_TO_KEEP in [value.name for value in session.get_overridable_initializers()]
    np.testing.assert_allclose(session.run([LOGITS], feeds)[0], dense, atol=1e-5, rtol=0)
    for keep, expected in ((0, dense), (1, dense[:, -1:]), (2, dense[:, -2:]), (3, dense), (9, dense)):
        logits = session.run([LOGITS], {**feeds, LOGITS_TO_KEEP: np.array(keep, np.int64)})[0]
        assert logits.shape == expected.shape, keep
        np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0, err_msg=str(keep))


def test_the_weight_and_fusion_passes_take_the_sliced_head(exported_llama, decoder_parity, tmp_path):
    _, path = exported_llama
    feeds = decoder_parity.feeds(3)
    model = KeepLastLogitsPass()(ir.load(path)).model
    model = QuantizeWeightsPass(bits=8)(model).model
    model = FuseOrtOpsPass()(model).model
    session = _session(model, tmp_path)
    full = session.run([LOGITS], feeds)[0]
    last = session.run([LOGITS], {**feeds, LOGITS_TO_KEEP: np.array(1, np.int64)})[0]
    np.testing.assert_allclose(last, full[:, -1:], atol=1e-5, rtol=0)


def test_a_second_run_and_a_fused_model_are_refused(exported_llama):
    _, path = exported_llama
    model = KeepLastLogitsPass()(ir.load(path)).model
    with pytest.raises(PassInputError, match="already has a 'logits_to_keep' input"):
        KeepLastLogitsPass()(model)
    fused = FuseOrtOpsPass()(ir.load(path)).model
    with pytest.raises(ir.passes.PreconditionError, match="before FuseOrtOpsPass"):
        KeepLastLogitsPass()(fused)
