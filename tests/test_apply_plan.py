"""Applying plans to torch models: removal, low-rank replacement, hash checks."""

import copy

import pytest
import torch
from torch import nn

from edgecompress.apply_plan import apply_plan
from edgecompress.attribution.low_rank import LowRankLinear
from edgecompress.attribution.svd import weight_basis
from edgecompress.compress import make_plan
from edgecompress.errors import EdgeCompressError
from edgecompress.plan import CompressionPlan, LayerPlan, LinearPlan, model_weights_hash

torch.set_num_threads(1)

from functools import partial

from tests import tiny_models
from tests.helpers import random_calibration

tiny_llama = partial(tiny_models.tiny_llama, layers=5)
tiny_qwen2 = partial(tiny_models.tiny_qwen2, biased=("q_proj",))




def calibration():
    return random_calibration(2, 12, seed=0)


def full_rank_plan(model) -> CompressionPlan:
    """Every Linear of layer 1 replaced at full rank: must reproduce the dense model."""
    linears, factors = [], {}
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        module = f"model.layers.1.{name}"
        linear = model.get_submodule(module)
        basis = weight_basis(linear, torch.float64)
        kept = list(range(basis.rank))
        a, b = basis.factors(kept)
        factors[f"{module}.A"], factors[f"{module}.B"] = a.numpy(), b.numpy()
        if linear.bias is not None:
            factors[f"{module}.bias"] = linear.bias.detach().numpy()
        linears.append(LinearPlan(name, module, linear.in_features, linear.out_features, basis.rank, kept,
                                  has_bias=linear.bias is not None))
    n = len(model.model.layers)
    layers = [LayerPlan(i, f"model.layers.{i}", "replace" if i == 1 else "keep", linears if i == 1 else [])
              for i in range(n)]
    return CompressionPlan("manual", {}, layers, {}, {}, model_weights_hash(model), {"hash": "x"},
                           {"num_hidden_layers": n}, factors)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2])
def test_full_rank_low_rank_reproduces_dense_logits(build):
    model = build()
    ids = calibration().input_ids
    with torch.no_grad():
        dense = model(ids).logits
    apply_plan(model, full_rank_plan(model))
    assert isinstance(model.model.layers[1].mlp.down_proj, LowRankLinear)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, dense, atol=1e-4)


def test_remove_matches_manual_deletion_and_cache_works():
    model = tiny_llama()
    plan = make_plan(model, calibration(), "shortgpt", n_layers=2, ratio=None)
    removed = plan.removed_layers
    manual = copy.deepcopy(model)
    manual.model.layers = nn.ModuleList(
        [layer for i, layer in enumerate(manual.model.layers) if i not in removed])
    manual.config.num_hidden_layers = 3
    for i, layer in enumerate(manual.model.layers):
        layer.self_attn.layer_idx = i
    apply_plan(model, plan)
    ids = calibration().input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, manual(ids).logits)
    assert model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    # Greedy decoding with the KV cache equals greedy decoding without it.
    prompt = ids[:1, :5]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("method", ["grasp", "grasp-w", "svd-llm"])
def test_applied_low_rank_matches_plan_accounting(method):
    model = tiny_qwen2()
    dense_params = sum(p.numel() for p in model.parameters())
    plan = make_plan(model, calibration(), method, ratio=0.2, rho=0.7)
    apply_plan(model, plan)
    assert sum(p.numel() for p in model.parameters()) == plan.params["after"]
    assert plan.params["dense_total"] == dense_params
    with torch.no_grad():
        assert torch.isfinite(model(calibration().input_ids).logits).all()


def test_plan_for_other_weights_is_refused():
    plan = make_plan(tiny_llama(), calibration(), "shortgpt", n_layers=1, ratio=None)
    other = tiny_llama(seed=7)
    with pytest.raises(EdgeCompressError, match="model weights"):
        apply_plan(other, plan)
    assert len(other.model.layers) == 5  # nothing changed


def test_plan_for_other_shape_is_refused():
    plan = make_plan(tiny_llama(), calibration(), "shortgpt", n_layers=1, ratio=None)
    with pytest.raises(EdgeCompressError, match="layers"):
        apply_plan(tiny_llama(layers=4), plan, check_hash=False)
