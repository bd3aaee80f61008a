"""The fp16 stage's decisions on a tiny exported Llama: block lists from a scan, the escalation order,
the one-line failure with the measured numbers, and bf16 when fp16 storage would overflow."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from edgecompress import contract, half_precision
from edgecompress.targets import profiles
from edgecompress.activation_scan import ActivationScan
from edgecompress.errors import VerificationError
from edgecompress.half_precision import Fp16Text, convert_and_validate, mask_tensors, plan_blocks
from edgecompress.passes import FuseGroupQueryAttentionPass, FuseOrtOpsPass

TEXT = [1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45]


def _profile(**verify_float16):
    table = {"name": "t", "description": "t", "device": "cuda", "execution_provider": ["CPUExecutionProvider"],
             "dtype": "float16", "verify": {"float16": verify_float16}}
    if "bf16" in verify_float16:
        table["bf16_supported"] = verify_float16.pop("bf16")
    return profiles.parse_profile(table, "test")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny model's fp32 export: the reference folder."""
    from edgecompress.export import export_onnx, save_model
    from tests.tiny_models import make_model

    folder = tmp_path_factory.mktemp("fp32")
    save_model(export_onnx(make_model())[0], folder)
    return folder


def _fused(folder) -> ir.Model:
    model = ir.load(str(folder / contract.MODEL_FILE))
    FuseOrtOpsPass()(model)
    FuseGroupQueryAttentionPass()(model)
    return model


def _run(model, reference, tmp_path, profile):
    staging, work = tmp_path / "staging", tmp_path / "work"
    staging.mkdir()
    return convert_and_validate(model, staging, reference, work, Fp16Text([TEXT], [], "test ids"), TEXT, profile,
                                lambda message: None, providers=["CPUExecutionProvider"]), staging


def test_hot_tensors_keep_their_producer_and_readers_fp32(reference):
    model = _fused(reference)
    graph = model.graph
    masks = mask_tensors(graph)
    producers = {v.producer().op_type for node in graph for v in node.outputs if v.name in masks}
    assert masks and producers <= half_precision._MASK_CARRIERS | {"Constant", "ConstantOfShape"}
    hidden = next(node for node in graph if node.op_type == "SkipSimplifiedLayerNormalization").outputs[3]
    absmax = {name: 1.0 for name in masks} | {hidden.name: 20000.0, "logits": 30.0}
    producers = {hidden.name: (hidden.producer().name, hidden.producer().op_type)}
    scan = ActivationScan({**{m: 3.4e38 for m in masks}, **absmax}, producers, 1, 12, "test")

    blocks = plan_blocks(graph, scan, profiles.Fp16Policy(absmax_block=16384.0))

    assert blocks.hot == {hidden.name: 20000.0}  # the mask's finfo.min is not "hot"
    expected = {hidden.producer().name} | {use.node.name for use in hidden.uses()}
    assert set(blocks.node_block_list) == expected and not blocks.overflow
    present = next(v for v in graph.outputs if v.name.startswith("present."))
    scan.absmax[present.name] = 70000.0
    assert plan_blocks(graph, scan, profiles.Fp16Policy()).overflow == [present.name]


def test_failing_parity_escalates_then_fails_in_one_line(reference, tmp_path):
    profile = _profile(max_abs_logit_delta=0.0)  # no fp16 artifact can meet it
    with pytest.raises(VerificationError) as caught:
        _run(_fused(reference), reference, tmp_path, profile)
    message = str(caught.value)
    assert "\n" not in message and "max_abs_logit_delta 0" in message
    assert "tried float16: artifact mean KL" in message and "; float16, lm_head fp32: artifact" in message
    assert message.endswith("the target has no bf16") and caught.value.exit_code == 3
    attempts = caught.value.report["precision"]["attempts"]
    assert [a["step"] for a in attempts] == ["float16", "float16, lm_head fp32"]
    assert attempts[1]["convert"]["blocked_by_reason"]["escalation: lm_head in fp32"] >= 1


def test_fp16_overflow_in_the_cache_escalates_to_bf16(reference, tmp_path):
    """Keys beyond 65504 are graph outputs, stored fp16 whatever the block list: bf16 (fp32's range)
    is the way out. The CPU provider cannot run bf16, so only its storage twin is checked."""
    from edgecompress.passes import build_layer_map

    model = _fused(reference)
    scaled = ir.load(str(reference / contract.MODEL_FILE))
    weight = build_layer_map(scaled.graph).linears["model.layers.0.self_attn.k_proj"].weight
    name = weight.name
    fused_weight = model.graph.initializers[name]
    fused_weight.const_value = ir.tensor(fused_weight.const_value.numpy() * 1e7, name=name)
    reference_copy = tmp_path / "ref"
    weight.const_value = ir.tensor(weight.const_value.numpy() * 1e7, name=name)
    from edgecompress.export import save_model

    save_model(scaled, reference_copy)
    profile = _profile(bf16=True, max_mean_kl=100.0, min_top1_agreement=0.0, max_abs_logit_delta=1e9)

    section, staging = _run(model, reference_copy, tmp_path, profile)

    assert section["dtype"] == "bfloat16" and section["escalation"] == ["float16", "bfloat16"]
    assert "reach 65504" in section["attempts"][0]["skipped"] and not section["runs_on_build_machine"]
    assert "cannot run" in section["checks"]["a_artifact_vs_fp32"]["skipped"]
    assert section["checks"]["c_twin_vs_fp32"]["summary"]["nonfinite"] == 0
    saved = ir.load(str(staging / contract.MODEL_FILE))
    types = {v.name: v.dtype for v in (*saved.graph.inputs, *saved.graph.outputs)}
    assert types["past_key_values.0.key"] == ir.DataType.BFLOAT16 and types["logits"] == ir.DataType.FLOAT
    assert np.isfinite(section["scan"]["max_absmax"]) and section["scan"]["max_absmax"] >= 65504
