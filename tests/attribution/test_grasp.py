"""GRASP factors, gradient accumulation, whitening and determinism on tiny random models."""

import json
import math

import pytest
import torch

from edgecompress.attribution.block_influence import layer_scores
from edgecompress.attribution.grasp import accumulated_sigma_gradients, group_scores
from edgecompress.attribution.layer_walker import LayerWalker
from edgecompress.attribution.singular_basis import SigmaLinear, top_indices
from edgecompress.attribution.svd import largest_sigma, weight_basis
from edgecompress.attribution.svd_llm import whitened_basis
from edgecompress.compress import make_plan
from edgecompress.errors import EdgeCompressError

torch.set_num_threads(1)

from functools import partial

from tests import tiny_models
from tests.helpers import random_calibration

tiny_llama = partial(tiny_models.tiny_llama, layers=4, hidden=48, intermediate=80)
tiny_qwen2 = tiny_models.tiny_qwen2




def calibration(n=3, length=12, seed=5):
    return random_calibration(n, length, seed=seed)


def expected_rank(m, n, rho):
    return max(1, min(math.floor(m * n * (1 - rho) / (m + n)), m, n))


def test_grasp_factor_shapes_follow_rank_formula():
    model, calib = tiny_llama(), calibration()
    plan = make_plan(model, calib, "grasp", n_layers=2, ratio=None, rho=0.9)
    assert len(plan.replaced_layers) == 2
    for linear in plan.low_rank_linears():
        m, n = linear.out_features, linear.in_features
        assert linear.rank == expected_rank(m, n, 0.9)
        assert plan.factors[f"{linear.module}.A"].shape == (linear.rank, n)
        assert plan.factors[f"{linear.module}.B"].shape == (m, linear.rank)
        assert len(set(linear.kept_indices)) == linear.rank
        assert all(0 <= i < min(m, n) for i in linear.kept_indices)
    names = {linear.name for linear in plan.low_rank_linears()}
    assert names == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def test_factors_equal_truncated_svd_when_scores_favor_top_sigma():
    linear = torch.nn.Linear(20, 12)
    basis = weight_basis(linear)
    scores = group_scores(basis, torch.ones(basis.rank, dtype=torch.float64), "taylor")  # = sigma
    kept = top_indices(scores, 5)
    assert kept == largest_sigma(basis, 5) == [0, 1, 2, 3, 4]
    a, b = basis.factors(kept)
    u, s, vt = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    truncated = u[:, :5] @ torch.diag(s[:5]) @ vt[:5]
    assert torch.allclose(b @ a, truncated, atol=1e-5)


def test_sigma_linear_reproduces_linear_with_bias():
    linear = torch.nn.Linear(16, 24)
    x = torch.randn(2, 5, 16)
    assert torch.allclose(SigmaLinear(weight_basis(linear), torch.float32)(x), linear(x), atol=1e-5)


def test_accumulated_gradient_equals_projected_weight_gradient():
    """∂L/∂σ_k = u_kᵀ (∂L/∂W) v_k, summed over batches, with the ordinary next-token loss."""
    model, calib = tiny_llama(), calibration()
    stream = layer_scores(model, calib.input_ids, batch_size=1).stream
    name = "model.layers.2.mlp.down_proj"
    linear = model.get_submodule(name)
    basis = weight_basis(linear, torch.float64)
    walker = LayerWalker(model, stream)
    hidden = walker.dense_inputs([2])[2]
    for p in model.parameters():
        p.requires_grad_(False)
    sums = accumulated_sigma_gradients(walker, {name: basis}, 2, hidden)
    assert model.get_submodule(name) is linear  # restored
    expected = torch.zeros(basis.rank, dtype=torch.float64)
    linear.weight.requires_grad_(True)
    for row in calib.input_ids:
        loss = model(row[None], labels=row[None]).loss
        (grad_w,) = torch.autograd.grad(loss, [linear.weight])
        expected += torch.einsum("ik,ij,jk->k", basis.U, grad_w.double(), basis.Vt.t())
    linear.weight.requires_grad_(False)
    assert torch.allclose(sums[name], expected, rtol=1e-3, atol=1e-6)


def test_whitened_basis_reconstructs_and_truncation_error_is_dropped_sigma():
    torch.manual_seed(0)
    linear = torch.nn.Linear(10, 6, bias=False)
    x = torch.randn(200, 10, dtype=torch.float64) * torch.linspace(0.1, 3, 10, dtype=torch.float64)
    gram = x.t() @ x
    basis = whitened_basis(linear, gram, jitter=1e-12)
    w = linear.weight.detach().double()
    assert torch.allclose(basis.U * basis.sigma @ basis.Vt, w, atol=1e-8)
    kept = largest_sigma(basis, 3)
    index = torch.tensor(kept)
    w_low = (basis.U[:, index] * basis.sigma[index]) @ basis.Vt[index]
    error = ((w - w_low) @ x.t()).pow(2).sum()
    assert float(error) == pytest.approx(float(basis.sigma[3:].pow(2).sum()), rel=1e-6)


@pytest.mark.parametrize("method", ["grasp", "grasp-w", "grasp-wr", "svd-llm"])
def test_same_inputs_give_same_plan(tmp_path, method):
    calib = calibration()
    first = make_plan(tiny_llama(), calib, method, ratio=0.25, rho=0.8)
    second = make_plan(tiny_llama(), calib, method, ratio=0.25, rho=0.8)
    assert first.plan_hash == second.plan_hash
    first.save(tmp_path / "a")
    second.save(tmp_path / "b")
    assert (tmp_path / "a/plan.json").read_bytes() == (tmp_path / "b/plan.json").read_bytes()
    assert (tmp_path / "a/factors.safetensors").read_bytes() == (tmp_path / "b/factors.safetensors").read_bytes()


def test_make_plan_leaves_model_unchanged():
    model, calib = tiny_llama(), calibration()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    make_plan(model, calib, "grasp", n_layers=2, ratio=None)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == modules_before
    assert all(p.requires_grad for p in model.parameters())


def test_joint_schedule_and_angular_selection():
    model, calib = tiny_llama(layers=5), calibration()
    plan = make_plan(model, calib, "grasp", n_layers=2, ratio=None, schedule="joint", layer_selection="angular")
    replaced = plan.replaced_layers
    assert len(replaced) == 2 and replaced[1] == replaced[0] + 1
    assert plan.scores["angular_distance"]["block_size"] == 2


def test_qwen2_bias_goes_to_the_output_factor():
    model, calib = tiny_qwen2(), calibration()
    plan = make_plan(model, calib, "grasp", n_layers=1, ratio=None, rho=0.5)
    layer = plan.replaced_layers[0]
    q = next(lin for lin in plan.low_rank_linears() if lin.name == "self_attn.q_proj")
    assert q.has_bias
    bias = plan.factors[f"model.layers.{layer}.self_attn.q_proj.bias"]
    expected = model.model.layers[layer].self_attn.q_proj.bias.detach().numpy()
    assert (bias == expected).all()
    assert f"model.layers.{layer}.self_attn.o_proj.bias" not in plan.factors


def test_plan_json_is_plain_json(tmp_path):
    plan = make_plan(tiny_llama(), calibration(), "grasp-wt", n_layers=1, ratio=None)
    plan.save(tmp_path)
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["method"] == "grasp-wt"
    assert data["layers"][plan.replaced_layers[0]]["linears"][0]["basis"] == "whitened"
    assert len(data["scores"]["block_influence"]) == 4


def test_error_aware_whitening_differs_and_restores_model():
    model, calib = tiny_llama(), calibration()
    modules_before = [type(m) for m in model.modules()]
    original = make_plan(model, calib, "grasp-w", n_layers=2, ratio=None, rho=0.6)
    aware = make_plan(model, calib, "grasp-w", n_layers=2, ratio=None, rho=0.6, whitening="compressed")
    assert [type(m) for m in model.modules()] == modules_before
    assert original.replaced_layers == aware.replaced_layers
    assert aware.settings["whitening"] == "compressed"
    # q/k/v see the same inputs either way; the first o_proj sees compressed attention outputs.
    first = original.replaced_layers[0]
    q = f"model.layers.{first}.self_attn.q_proj.A"
    o = f"model.layers.{first}.self_attn.o_proj.A"
    assert (original.factors[q] == aware.factors[q]).all()
    assert not (original.factors[o] == aware.factors[o]).all()


def test_refit_lowers_each_layers_error_and_only_moves_the_factors():
    model, calib = tiny_llama(), calibration()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    plain = make_plan(model, calib, "grasp-w", n_layers=2, ratio=None, rho=0.6)
    refit = make_plan(model, calib, "grasp-wr", n_layers=2, ratio=None, rho=0.6, refit_steps=30, refit_lr=1e-3)
    assert [type(m) for m in model.modules()] == modules_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad is False for p in model.parameters())
    assert refit.replaced_layers == plain.replaced_layers
    assert refit.settings["refit_steps"] == 30 and "refit_steps" not in plain.settings
    errors = refit.scores["refit"]
    assert sorted(int(i) for i in errors) == refit.replaced_layers
    for values in errors.values():
        assert values["relative_mse_after"] < values["relative_mse_before"]
    # Same ranks and shapes as the starting point, different values.
    for key, factor in plain.factors.items():
        assert refit.factors[key].shape == factor.shape
    assert any(not (refit.factors[k] == plain.factors[k]).all() for k in plain.factors if k.endswith(".A"))


def test_end_to_end_refit_lowers_the_final_hidden_error():
    model, calib = tiny_llama(), calibration()
    refit = make_plan(model, calib, "grasp-wre", n_layers=2, ratio=None, rho=0.6, refit_steps=30, refit_lr=1e-3)
    errors = refit.scores["refit"]
    assert errors["final_hidden_relative_mse_after"] < errors["final_hidden_relative_mse_before"]
    assert refit.settings["refit_steps"] == 30
    with pytest.raises(EdgeCompressError, match="refit_steps"):
        make_plan(model, calib, "grasp-wre", n_layers=1, ratio=None, refit_steps=0)


@pytest.mark.parametrize("kind", ["weight", "whitened"])
def test_sigma_gradients_from_the_stock_weight_gradient_equal_the_sigma_path(kind):
    """weight_sigma_gradients (no module swapped: what a sharded model can run) against accumulated_sigma_gradients,
    in float64, for every Linear of two layers scored together, in the weight and the whitened basis (enough tokens
    for full-rank Gram matrices: a jittered, ill-conditioned whitening reconstructs W only to cond(L)·eps)."""
    from edgecompress.attribution.grasp import weight_sigma_gradients
    from edgecompress.attribution.layer_walker import layer_linears
    from edgecompress.attribution.svd_llm import input_grams

    model, calib = tiny_llama().double(), calibration(n=8, length=24)
    stream = layer_scores(model, calib.input_ids, batch_size=2).stream
    walker = LayerWalker(model, stream)
    for p in model.parameters():
        p.requires_grad_(False)
    hidden = walker.dense_inputs([1, 2])
    bases = {}
    for index in (1, 2):
        linears = layer_linears(walker.layers[index])
        grams = input_grams(walker, index, linears, hidden[index]) if kind == "whitened" else None
        for name, linear in linears.items():
            basis = whitened_basis(linear, grams[name]) if grams else weight_basis(linear, torch.float64)
            bases[f"model.layers.{index}.{name}"] = basis
    sigma_path = accumulated_sigma_gradients(walker, bases, 1, hidden[1])
    weight_path = weight_sigma_gradients(walker, bases, 1, hidden[1])
    assert all(not p.requires_grad for p in model.parameters())  # flags restored
    for name in bases:
        scale = sigma_path[name].abs().max()
        assert scale > 0
        assert (weight_path[name] - sigma_path[name]).abs().max() <= 1e-12 * scale, name
