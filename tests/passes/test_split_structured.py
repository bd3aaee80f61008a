"""SplitStructuredPass through ReplaceLayersPass.from_plan: a structured plan's Linears become MonarchMatMul /
BlastMatMul nodes (before/after structure), the lowered graph matches PyTorch with the same plan applied in
onnxruntime, and bad factors are one-line errors."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from edgecompress.apply_plan import apply_plan
from edgecompress.compress import make_plan
from edgecompress.errors import EdgeCompressError
from edgecompress.kernels.reference import DOMAIN
from edgecompress.passes import LowerCustomOpsPass, ReplaceLayersPass, SplitStructuredPass, build_layer_map
from edgecompress.structures import STRUCTURES
from tests.helpers import random_calibration

OPS = {name: STRUCTURES[name].op for name in ("monarch", "blast")}


def _plan(torch_model, structure):
    """A real plan: the lowest-BI layer of the tiny model made `structure` (grasp-w, 4 blocks)."""
    import torch

    torch.set_num_threads(1)
    return make_plan(torch_model, random_calibration(2, 8, vocab=32), "grasp-w", ratio=None, n_layers=1,
                     structure=structure)


def _custom_nodes(model):
    return collections.Counter(node.op_type for node in model.graph if node.domain == DOMAIN)


# Qwen2's q/k/v biases stay in their Add nodes (the plan's bias written there); one export per structure keeps it fast.
@pytest.mark.parametrize(("structure", "exported"), [("monarch", "exported_qwen2"), ("blast", "exported_llama")])
def test_plan_linears_become_structured_ops_that_match_torch(structure, exported, request, decoder_parity):
    import copy

    import onnx_ir as ir

    torch_model, path = request.getfixturevalue(exported)
    torch_model = copy.deepcopy(torch_model)
    onnx_model = ir.load(path)
    plan = _plan(torch_model, structure)
    (layer,) = plan.replaced_layers
    before = build_layer_map(onnx_model.graph)
    assert all(f"model.layers.{layer}.{lin.name}" in before.linears for lin in plan.low_rank_linears())

    result = ReplaceLayersPass.from_plan(plan)(onnx_model)

    assert result.modified and result.stats.structured == {OPS[structure]: 7} and result.stats.matmuls_split == 0
    assert result.stats.params_after == sum(lin.params for lin in plan.low_rank_linears())
    assert _custom_nodes(onnx_model) == {OPS[structure]: 7}
    assert onnx_model.graph.opset_imports[DOMAIN] == 1
    after = build_layer_map(onnx_model.graph)  # the Linears are no MatMuls any more; the other layers are
    assert not any(name.startswith(f"model.layers.{layer}.") for name in after.linears)
    assert len(after.linears) == len(before.linears) - 7
    weight_shapes = sorted(tuple(value.shape) for node in onnx_model.graph if node.domain == DOMAIN
                           for value in node.inputs[1:])
    assert weight_shapes == sorted(shape for lin in plan.low_rank_linears() for shape in lin.factor_shapes())

    LowerCustomOpsPass()(onnx_model)
    assert not _custom_nodes(onnx_model) and DOMAIN not in onnx_model.graph.opset_imports
    apply_plan(torch_model, plan, check_hash=False)
    feeds = decoder_parity.feeds(3)
    decoder_parity.assert_close(decoder_parity.onnx(onnx_model, feeds), decoder_parity.torch(torch_model, feeds))


def test_bad_factors_are_one_line_errors(fresh_torch_and_onnx):
    _, onnx_model = fresh_torch_and_onnx
    module = "model.layers.1.self_attn.q_proj"  # 32 x 32
    rng = np.random.default_rng(0)
    cases = [
        ({module: ("monarch", (rng.standard_normal((4, 8, 8)), rng.standard_normal((4, 8, 6))), None)},
         r"give a \[24, 32\] weight, the graph has \[32, 32\]"),
        ({module: ("monarch", (rng.standard_normal((4, 8, 6)), rng.standard_normal((4, 6, 8))), None)},
         r"R=6 channels per block must be a multiple of the 4 blocks"),
        ({module: ("blast", (rng.standard_normal((4, 2, 8)),), None)}, r"BlastMatMul needs U, S, V"),
        ({module: ("butterfly", (), None)}, r"structure 'butterfly'"),
    ]
    for factors, message in cases:
        with pytest.raises(EdgeCompressError, match=message) as error:
            SplitStructuredPass(factors)(onnx_model)
        assert "\n" not in str(error.value)
    assert not _custom_nodes(onnx_model)  # nothing half-done
