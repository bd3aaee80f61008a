"""Structured plans (--structure monarch|blast) on the PyTorch side: what the plan records, its factors in the
reference layouts, the round trip through disk, apply_plan's modules, older plans, and refused options."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from edgecompress.apply_plan import apply_plan
from edgecompress.attribution.structured import BlastLinear, MonarchLinear
from edgecompress.compress import make_plan
from edgecompress.errors import EdgeCompressError
from edgecompress.kernels import reference
from edgecompress.options import CompressOptions
from edgecompress.plan import CompressionPlan
from tests.helpers import random_calibration
from tests.tiny_models import tiny_llama, tiny_qwen2

torch.set_num_threads(1)
MODULES = {"monarch": MonarchLinear, "blast": BlastLinear}
OPS = {"monarch": reference.monarch_matmul, "blast": reference.blast_matmul}


@pytest.fixture(scope="module")
def plans():
    """grasp-wr plans of a tiny Qwen2 (q/k/v biases) for both structures: projection + refit."""
    calibration = random_calibration(2, 12, seed=0)
    model = tiny_qwen2()
    return model, {structure: make_plan(model, calibration, "grasp-wr", ratio=0.2, structure=structure, refit_steps=8)
                   for structure in ("monarch", "blast", "lowrank")}


@pytest.mark.parametrize("structure", ["monarch", "blast"])
def test_plan_records_structure_blocks_ranks_and_parameters(plans, structure):
    _, by_structure = plans
    plan, low_rank = by_structure[structure], by_structure["lowrank"]
    assert plan.settings["structure"] == structure and plan.settings["blocks"] == 4
    linears = plan.low_rank_linears()
    assert linears and all(lin.structure == structure and lin.blocks == 4 for lin in linears)
    dense, saved = plan.params["dense_total"], 0
    for linear in linears:
        shapes = [plan.factors[f"{linear.module}.{part}"].shape for part in linear.factor_names]
        assert [tuple(s) for s in shapes] == list(linear.factor_shapes())
        assert linear.params == sum(int(np.prod(s)) for s in shapes)
        assert 0 < linear.scores["calibration_output"] and 0 < linear.scores["frobenius"] < 1.5
        saved += linear.in_features * linear.out_features - linear.params
    assert plan.params["removed"] == saved and plan.params["achieved_ratio"] == pytest.approx(saved / dense)
    # The same layers as low-rank at a comparable parameter count (tiny widths round ranks coarsely).
    assert plan.replaced_layers == low_rank.replaced_layers
    assert abs(plan.params["achieved_ratio"] - low_rank.params["achieved_ratio"]) < 0.06
    assert set(plan.scores["refit"]) == {str(i) for i in plan.replaced_layers}


@pytest.mark.parametrize("structure", ["monarch", "blast"])
def test_saved_plan_applies_modules_that_compute_the_reference(plans, structure, tmp_path):
    model, by_structure = plans
    loaded = CompressionPlan.load(by_structure[structure].save(tmp_path / structure))
    assert loaded.plan_hash == by_structure[structure].plan_hash
    applied = apply_plan(copy.deepcopy(model), loaded)
    rng = np.random.default_rng(0)
    for linear in loaded.low_rank_linears():
        x = rng.standard_normal((2, 3, linear.in_features)).astype(np.float32)
        module = applied.get_submodule(linear.module)
        assert isinstance(module, MODULES[structure])
        factors = [loaded.factors[f"{linear.module}.{part}"] for part in linear.factor_names]
        bias = loaded.factors.get(f"{linear.module}.bias")
        with torch.no_grad():
            got = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, OPS[structure](x, *factors, bias), atol=1e-5)


def test_a_plan_written_before_structures_loads_as_low_rank(plans, tmp_path):
    _, by_structure = plans
    folder = by_structure["lowrank"].save(tmp_path / "old")
    data = json.loads((folder / "plan.json").read_text())
    for layer in data["layers"]:
        for linear in layer["linears"]:
            for key in ("structure", "blocks", "params"):
                linear.pop(key)
    (folder / "plan.json").write_text(json.dumps(data))
    old = CompressionPlan.load(folder)
    assert all(lin.structure == "lowrank" and lin.factor_names == ("A", "B") for lin in old.low_rank_linears())


def test_a_plan_missing_a_structured_factor_is_refused(plans, tmp_path):
    _, by_structure = plans
    plan = copy.copy(by_structure["blast"])
    module = plan.low_rank_linears()[0].module
    plan.factors = {k: v for k, v in plan.factors.items() if k != f"{module}.S"}
    with pytest.raises(EdgeCompressError, match=rf"plan factors miss {module}\.S"):
        plan.validate()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(structure="butterfly"), "unknown structure 'butterfly'; use one of lowrank, monarch, blast"),
        (dict(blocks=4), "--blocks applies to --structure monarch or blast, not lowrank"),
        (dict(structure="monarch", blocks=1), "--blocks must be a whole number of at least 2"),
        (dict(structure="blast", method="grasp"), "grasp scores singular groups"),
        (dict(structure="monarch", method="shortgpt"), "shortgpt removes layers"),
    ],
)
def test_bad_structure_options_are_one_line_errors(options, message):
    settings = CompressOptions(**{"method": "grasp-wr", "ratio": 0.2, **options})
    with pytest.raises(EdgeCompressError, match=message) as error:
        settings.validate()
    assert "\n" not in str(error.value)


def test_blocks_that_do_not_divide_a_linear_are_refused_before_any_data_pass():
    calls = []
    with pytest.raises(EdgeCompressError, match=r"--blocks 5 does not divide layer 0's self_attn.q_proj \(32 x 32\)"):
        make_plan(tiny_llama(), random_calibration(2, 12), "grasp-w", ratio=0.2, structure="monarch", blocks=5,
                  progress=lambda *args: calls.append(args))
    assert not calls


def test_whitened_blast_stays_bounded_when_the_calibration_does_not_span_the_inputs():
    """32 calibration tokens for 64 input features: the Gram is singular. Without the ridge on it, V grew to
    ~8e3 along directions no token reaches (and one Linear's error to 12.9x its output), which failed
    verification in fp32."""
    plan = make_plan(tiny_llama(layers=3, hidden=64, intermediate=128), random_calibration(2, 16), "grasp-w",
                     ratio=0.2, structure="blast", blocks=2)
    assert max(float(np.abs(array).max()) for array in plan.factors.values()) < 10
    assert all(lin.scores["calibration_output"] < 1 for lin in plan.low_rank_linears())
