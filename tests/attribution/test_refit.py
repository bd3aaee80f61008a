"""The default method's parts: held-out calibration windows, the logit (KL) refit with early stopping,
the attribution-split budget, and `auto`, on tiny random Llama, Qwen2 and Mistral models."""

import pytest
import torch

from edgecompress.attribution.refit import _HoldoutTracker
from edgecompress.attribution.factor_choice import ranks_for
from edgecompress.compress import make_plan
from edgecompress.errors import EdgeCompressError
from edgecompress.methods import AUTO, resolve_method
from tests import tiny_models
from tests.helpers import random_calibration

torch.set_num_threads(1)


def held_out_calibration(n=6, holdout=2, length=12, seed=3):
    return random_calibration(n + holdout, length, seed=seed).split_holdout(holdout)


def test_split_holdout_keeps_the_last_windows_apart():
    calib = random_calibration(5, 8, seed=1)
    ids = calib.input_ids.clone()
    calib.split_holdout(2)
    assert calib.n_sequences == 3 and calib.n_holdout == 2
    assert torch.equal(calib.input_ids, ids[:3]) and torch.equal(calib.holdout_ids, ids[3:])
    assert calib.describe()["holdout_sequences"] == 2
    with pytest.raises(EdgeCompressError, match="cannot keep 3 out"):
        random_calibration(3, 8).split_holdout(3)


class Scripted:
    """A held-out objective whose mean follows a script (to drive the tracker exactly)."""

    def __init__(self, values):
        self.values = list(values)

    def mean(self):
        return self.values.pop(0)


def test_holdout_tracker_stops_after_patience_and_restores_the_best():
    weight = torch.nn.Parameter(torch.zeros(2))
    tracker = _HoldoutTracker(Scripted([5.0, 4.0, 4.5, 4.6, 4.7]), [weight], patience=3)
    with torch.no_grad():
        weight.fill_(1.0)
    assert not tracker.measure(8)  # 4.0: best, weight 1 kept
    with torch.no_grad():
        weight.fill_(2.0)
    assert not tracker.measure(16) and not tracker.measure(24)
    assert tracker.measure(32)  # third measurement without a gain
    tracker.restore_best()
    assert torch.equal(weight.detach(), torch.ones(2))
    report = tracker.report(64)
    assert report["best_step"] == 8 and report["steps_run"] == 32 and report["holdout_before"] == 5.0


def test_logit_refit_lowers_kl_and_is_measured_on_held_out_windows():
    model, calib = tiny_models.tiny_llama(layers=4, hidden=48, intermediate=80), held_out_calibration()
    plain = make_plan(model, calib, "grasp-w", n_layers=2, ratio=None, rho=0.6)
    plan = make_plan(model, calib, "grasp-wrk", n_layers=2, ratio=None, rho=0.6, refit_steps=24, refit_lr=5e-4)
    refit = plan.scores["refit"]
    end = refit["end-to-end"]
    assert end["loss"] == "kl" and end["logit_kl_after"] < end["logit_kl_before"]
    assert set(refit["layer"]) == {str(i) for i in plan.replaced_layers}
    assert end["holdout_history"][0][0] == 0 and end["best_step"] <= end["steps_run"] <= 24
    assert end["holdout_best"] <= end["holdout_before"]
    assert plan.replaced_layers == plain.replaced_layers
    assert any(not (plan.factors[k] == plain.factors[k]).all() for k in plain.factors if k.endswith(".B"))


def test_global_allocation_spends_the_same_budget_on_the_best_scored_groups():
    linear = lambda m, n: torch.nn.Linear(n, m, bias=False)  # noqa: E731
    targets = {"wide": (0, "a", linear(8, 32), None), "square": (0, "b", linear(16, 16), None)}
    # Every group of "square" scores higher per parameter than any group of "wide".
    scored = {"wide": torch.linspace(1.0, 0.1, 8), "square": torch.linspace(100.0, 50.0, 16)}
    per_matrix = ranks_for(targets, scored, 0.5, "matrix")
    spread = ranks_for(targets, scored, 0.5, "global")
    budget = lambda ranks: 40 * ranks["wide"] + 32 * ranks["square"]  # noqa: E731
    assert budget(spread) <= budget(per_matrix)
    assert spread == {"square": 6, "wide": 1}  # "square" first; "wide" keeps its one best group
    assert ranks_for(targets, {"wide": scored["square"][:8], "square": scored["wide"].repeat(2)}, 0.5, "global") == {
        "square": 1, "wide": 5}


@pytest.mark.parametrize("build", [tiny_models.tiny_qwen2, tiny_models.tiny_mistral])
def test_the_default_method_builds_other_families(build):
    model, calib = build(layers=3), held_out_calibration(n=4, holdout=2)
    plan = make_plan(model, calib, ratio=0.2, refit_steps=8)
    assert plan.method == resolve_method(AUTO, 0.2) and plan.settings["method_requested"] == AUTO
    assert plan.replaced_layers and plan.scores["refit"]["end-to-end"]["steps_run"] <= 8
    assert abs(plan.params["achieved_ratio"] - 0.2) < 0.15


def test_the_default_method_takes_its_embedding_share_and_still_refits():
    from tests.attribution.test_embedding import tied_llama

    model = tied_llama(vocab=48, hidden=16)
    calib = random_calibration(10, 12, seed=4, vocab=48).split_holdout(2)
    plan = make_plan(model, calib, "grasp-wrk", ratio=0.3, refit_steps=8, exact_tokens=4)
    embedding = plan.embedding
    assert embedding is not None and embedding.exact_tokens == 4 and plan.settings["embedding_share"] > 0
    layers_only = make_plan(model, calib, "grasp-wrk", ratio=0.3, refit_steps=8, embedding_share=0.0)
    assert layers_only.embedding is None
    assert plan.params["removed"] == embedding.saving + sum(
        lin.in_features * lin.out_features - lin.params for lin in plan.low_rank_linears())
    assert abs(plan.params["achieved_ratio"] - 0.3) < abs(layers_only.params["achieved_ratio"] - 0.3) + 0.1
    assert type(model.get_output_embeddings()).__name__ == "Linear"  # restored
    end = plan.scores["refit"]["end-to-end"]
    assert end["logit_kl_after"] <= end["logit_kl_before"]


def test_a_small_vocabulary_keeps_an_eighth_exact_and_an_unreachable_share_goes_to_the_layers():
    from tests.attribution.test_embedding import tied_llama

    model = tied_llama(vocab=48, hidden=16)
    calib = random_calibration(10, 12, seed=4, vocab=48).split_holdout(2)
    plan = make_plan(model, calib, "grasp-wrk", ratio=0.3, refit_steps=4)  # 2,048 exact tokens asked
    assert plan.embedding is not None and plan.embedding.exact_tokens == 48 // 8
    greedy = make_plan(model, calib, "grasp-wrk", ratio=0.3, refit_steps=4, embedding_share=0.9)
    assert greedy.embedding is None and greedy.settings["embedding_share"] == 0.0 and greedy.replaced_layers
