"""Plan arithmetic, ratio planning, save/load and hash checks."""

import json

import numpy as np
import pytest
import torch

from edgecompress.calibrate import CalibrationSet
from edgecompress.compress import make_plan
from edgecompress.errors import EdgeCompressError
from edgecompress.plan import (
    CompressionPlan,
    count_for_ratio,
    low_rank_rank,
    low_rank_saving,
    model_weights_hash,
    uniform_rho_for_ratio,
)

torch.set_num_threads(1)

from tests.helpers import random_calibration
from tests.tiny_models import tiny_llama

# SmolLM2-135M shape: d=576, d_ff=1536, 3 KV heads of 64, 134,515,045 parameters, 30 layers.
SMOL_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
SMOL_TOTAL = 134_515_045



def calibration():
    return random_calibration(2, 10, seed=0)


def test_rank_formula_on_smollm2_shapes():
    assert [low_rank_rank(m, n, 0.9) for m, n in SMOL_SHAPES] == [28, 14, 14, 28, 41, 41, 41]
    per_layer = sum(low_rank_saving(m, n, low_rank_rank(m, n, 0.9)) for m, n in SMOL_SHAPES)
    assert per_layer / SMOL_TOTAL == pytest.approx(0.0237, abs=5e-4)
    assert count_for_ratio([per_layer] * 30, SMOL_TOTAL, 0.10) == 4  # 9.5 %, as in reference-points
    assert count_for_ratio([per_layer] * 30, SMOL_TOTAL, 0.20) == 8  # 19.0 %
    assert count_for_ratio([per_layer] * 30, SMOL_TOTAL, 0.20, rounding="at_least") == 9  # 21.4 %
    assert low_rank_rank(4, 4, 0.999) == 1  # clamped


def test_uniform_rho_reaches_the_ratio():
    shapes = SMOL_SHAPES * 30
    rho = uniform_rho_for_ratio(shapes, SMOL_TOTAL, 0.2)
    saved = sum(low_rank_saving(m, n, low_rank_rank(m, n, rho)) for m, n in shapes)
    assert 0.2 <= saved / SMOL_TOTAL < 0.203  # one rank step in every matrix is ~0.05 %


@pytest.mark.parametrize("ratio", [0, 0.0, 1, 1.5, -0.1, None])
def test_ratio_outside_open_unit_interval_is_refused(ratio):
    with pytest.raises(EdgeCompressError, match="ratio"):
        make_plan(tiny_llama(), calibration(), "grasp", ratio=ratio)


@pytest.mark.parametrize("method", ["grasp", "shortgpt", "svd"])
def test_unreachable_ratio_is_refused(method):
    with pytest.raises(EdgeCompressError, match="out of reach"):
        make_plan(tiny_llama(), calibration(), method, ratio=0.97)


def test_ratio_planning_picks_lowest_bi_layers():
    model = tiny_llama()
    plan = make_plan(model, calibration(), "shortgpt", ratio=0.3)
    bi = plan.scores["block_influence"]
    removed = plan.removed_layers
    assert sorted(bi)[: len(removed)] == sorted(bi[i] for i in removed)
    params = plan.params
    assert params["after"] == params["dense_total"] - params["removed"]
    assert params["achieved_ratio"] == params["removed"] / params["dense_total"]
    # Nearest rounding of whole layers: within half of one layer's share of the parameters.
    layer_share = sum(p.numel() for p in model.model.layers[0].parameters()) / params["dense_total"]
    assert abs(params["achieved_ratio"] - 0.3) <= layer_share / 2
    assert len(removed) == round(0.3 / layer_share)


def test_save_load_round_trip(tmp_path):
    plan = make_plan(tiny_llama(), calibration(), "grasp", ratio=0.3, rho=0.8)
    plan.save(tmp_path)
    loaded = CompressionPlan.load(tmp_path)
    assert loaded.to_json_dict() == plan.to_json_dict()
    assert sorted(loaded.factors) == sorted(plan.factors)
    for name, value in plan.factors.items():
        assert loaded.factors[name].dtype == np.float32
        assert np.array_equal(loaded.factors[name], value)
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["format"] == "edgecompress.plan" and data["plan_hash"] == plan.plan_hash


def test_tampered_plan_is_refused(tmp_path):
    plan = make_plan(tiny_llama(), calibration(), "shortgpt", ratio=0.3)
    plan.save(tmp_path)
    data = json.loads((tmp_path / "plan.json").read_text())
    data["settings"]["rho"] = 0.5
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(EdgeCompressError, match="inconsistent"):
        CompressionPlan.load(tmp_path)
    with pytest.raises(EdgeCompressError, match="no plan.json"):
        CompressionPlan.load(tmp_path / "elsewhere")


def test_verify_hash():
    model = tiny_llama()
    plan = make_plan(model, calibration(), "shortgpt", ratio=0.3)
    plan.verify_hash(model_weights_hash(model))
    with pytest.raises(EdgeCompressError, match="model weights"):
        plan.verify_hash(model_weights_hash(tiny_llama(seed=1)))


def test_plan_hash_changes_with_settings_and_data():
    model = tiny_llama()
    base = make_plan(model, calibration(), "shortgpt", ratio=0.3)
    other_ratio = make_plan(model, calibration(), "shortgpt", ratio=0.2)
    other_data = CalibrationSet(calibration().input_ids.flip(1), "random tokens", "0" * 64, 0)
    assert len({base.plan_hash, other_ratio.plan_hash, make_plan(model, other_data, "shortgpt", ratio=0.3).plan_hash}) == 3


def test_removing_every_layer_is_out_of_reach():
    model = tiny_llama(layers=2)
    layer_share = sum(p.numel() for p in model.model.layers[0].parameters()) / sum(p.numel() for p in model.parameters())
    with pytest.raises(EdgeCompressError, match="out of reach"):
        make_plan(model, calibration(), "shortgpt", ratio=min(0.99, 1.5 * layer_share))
    with pytest.raises(EdgeCompressError, match="at most"):
        make_plan(model, calibration(), "shortgpt", n_layers=2, ratio=None)
