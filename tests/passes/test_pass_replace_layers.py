"""ReplaceLayersPass: a GRASP plan (some layers low-rank, some removed) applied in one pass."""

from __future__ import annotations

import numpy as np
import pytest

from edgecompress.errors import EdgeCompressError
from edgecompress.passes.replace_layers import ReplaceLayersPass


def _factors(rank: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rank, 4)).astype(np.float32), rng.standard_normal((4, rank)).astype(np.float32)


def test_replace_one_layer_and_remove_another(toy_decoder, structure):
    layer_1 = {"model.layers.1.self_attn.q_proj": _factors(2, 0), "model.layers.1.mlp.down_proj": _factors(1, 1)}
    model = toy_decoder([0, 1, 2])
    replace = ReplaceLayersPass({1: layer_1}, removed=[0])

    result = replace(model)

    assert result.modified
    assert structure(model) == structure(toy_decoder([1, 2], low_rank=layer_1))
    assert (result.stats.layers_replaced, result.stats.layers_removed, result.stats.matmuls_split) == (1, 1, 2)
    assert result.stats.params_after == 2 * 8 + 1 * 8


@pytest.mark.parametrize(
    ("replaced", "removed", "message"),
    [
        ({1: {"model.layers.1.self_attn.q_proj": _factors(2, 0)}}, [1], r"both replaced and removed"),
        ({0: {"model.layers.1.self_attn.q_proj": _factors(2, 0)}}, [], r"not in decoder layer 0"),
        ({5: {}}, [], r"cannot replace layers \[5\]"),
        ({}, [0, 1, 2], r"cannot remove all 3"),
    ],
)
def test_bad_plans_are_user_errors(toy_decoder, replaced, removed, message):
    with pytest.raises(EdgeCompressError, match=message) as error:
        ReplaceLayersPass(replaced, removed)(toy_decoder([0, 1, 2]))
    assert "\n" not in str(error.value)


def _plan(torch_model, replaced_layer, removed_layer, factors_for, rank):
    from edgecompress.plan import CompressionPlan, LayerPlan, LinearPlan

    linears, factors = [], {}
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        module = f"model.layers.{replaced_layer}.{name}"
        a, b = factors_for(torch_model, [module], rank=rank)[module]
        factors[f"{module}.A"], factors[f"{module}.B"] = a, b
        out_features, in_features = b.shape[0], a.shape[1]
        linears.append(LinearPlan(name, module, in_features, out_features, rank, list(range(rank))))
    layers = [
        LayerPlan(index, f"model.layers.{index}",
                  "replace" if index == replaced_layer else "remove" if index == removed_layer else "keep",
                  linears if index == replaced_layer else [])
        for index in range(3)
    ]
    return CompressionPlan("grasp", {}, layers, {}, {}, "hash", {}, factors=factors)


def test_exported_llama_with_a_plan_matches_torch(fresh_torch_and_onnx, decoder_parity, factors_for):
    import torch

    torch_model, onnx_model = fresh_torch_and_onnx
    plan = _plan(torch_model, replaced_layer=1, removed_layer=2, factors_for=factors_for, rank=3)

    result = ReplaceLayersPass.from_plan(plan)(onnx_model)
    with torch.no_grad():
        for linear in plan.low_rank_linears():
            product = plan.factors[f"{linear.module}.B"] @ plan.factors[f"{linear.module}.A"]
            torch_model.get_submodule(linear.module).weight.copy_(torch.from_numpy(product))
    decoder_parity.delete_layers(torch_model, [2])

    stats = result.stats
    assert (stats.layers_replaced, stats.layers_removed, stats.matmuls_split) == (1, 1, 7)
    feeds = decoder_parity.feeds(2)
    decoder_parity.assert_close(decoder_parity.onnx(onnx_model, feeds), decoder_parity.torch(torch_model, feeds))
