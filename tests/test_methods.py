"""Methods are typed entries (edgecompress/methods.py): a new one, or a new combination of stages, is one entry."""

from __future__ import annotations

import json

import pytest

from edgecompress import api
from edgecompress.compress import make_plan
from edgecompress.errors import EdgeCompressError
from edgecompress.methods import (
    METHODS,
    FactorChoice,
    LayerChoice,
    Method,
    RefitChoice,
    Stage,
    check_method,
)
from edgecompress.options import check_structure
from tests.helpers import random_calibration
from tests.tiny_models import make_model

TOY = Method("toy: the smallest singular groups", factors=FactorChoice(
    "weight", "smallest", stage=Stage("factors", "tests.toy_methods:smallest_sigma_factors")))


def test_stages_follow_the_entry():
    names = [stage.name for stage in METHODS["grasp-wrk"].stages]
    assert names == ["layer scores", "embedding budget", "choose layers", "chosen layers' inputs", "embedding factors",
                     "factors", "refit"]
    assert [stage.name for stage in METHODS["svd"].stages] == ["layer scores", "choose layers", "chosen layers' inputs",
                                                                "factors"]
    assert METHODS["shortgpt"].stages[-1].name == "remove layers"
    assert METHODS["grasp"].stages[-1].home.endswith(":attributed_factors")
    assert METHODS["grasp-w"].stages[-1].home.endswith(":largest_sigma_factors")
    assert TOY.stages[-1].function().__name__ == "smallest_sigma_factors"


@pytest.mark.parametrize("make", [
    lambda: Method("removes, with factors", LayerChoice("chosen", "remove"), FactorChoice()),
    lambda: Method("replaces, without factors"),
    lambda: Method("refits what it removed", LayerChoice("chosen", "remove"), refit=RefitChoice(("layer",))),
    lambda: FactorChoice(basis="sideways"),
    lambda: FactorChoice(selection="new rule without its stage"),
    lambda: FactorChoice(allocation="evenly"),
    lambda: RefitChoice(("layer", "upwards")),
    lambda: RefitChoice(("layer",), loss="l7"),
    lambda: LayerChoice("some"),
])
def test_a_malformed_entry_is_refused_where_it_is_written(make):
    with pytest.raises(EdgeCompressError):
        make()


def test_a_new_method_is_one_entry(tiny_llama_dir, calibration_file, tmp_path, monkeypatch):
    """Registered in METHODS only: the build, its checks, the plan and the artifact take it as any other."""
    monkeypatch.setitem(METHODS, "toy", TOY)
    assert check_method("toy") is TOY
    with pytest.raises(EdgeCompressError, match="scores singular groups|projects each weight"):
        check_structure("monarch", None, "toy")  # its factors are no projection of the weight
    out = tmp_path / "toy"
    report = api.build(str(tiny_llama_dir), "cpu-x86", out, ratio=0.1, method="toy", calibration=calibration_file,
                       eval_limit=0, calib_sequences=2, calib_seq_len=16)
    assert report["verification"]["passed"]
    plan = json.loads((out / "plan" / "plan.json").read_text())
    assert plan["method"] == "toy" and plan["settings"]["selection"] == "smallest"
    linears = [lin for layer in plan["layers"] if layer["action"] == "replace" for lin in layer["linears"]]
    assert linears
    for lin in linears:  # the toy's own stage chose the groups: the last (smallest) ones
        groups = min(lin["in_features"], lin["out_features"])
        assert lin["kept_indices"] == list(range(groups - lin["rank"], groups))
        assert lin["scores"]["metric"] == "-sigma"


def test_a_new_combination_of_stages_is_one_entry(monkeypatch):
    """Plain SVD factors with a layer-wise refit: no method had it; the entry alone makes the planner run it."""
    monkeypatch.setitem(METHODS, "svd-refit", Method("plain factors, refit per layer",
                                                     factors=FactorChoice("weight", "largest"),
                                                     refit=RefitChoice(("layer",))))
    model = make_model("llama", layers=4, vocab_size=64)
    calib = random_calibration(4, 16, vocab=64)
    plain = make_plan(model, calib, "grasp-topsigma", n_layers=2, ratio=None, rho=0.7)
    refit = make_plan(model, calib, "svd-refit", n_layers=2, ratio=None, rho=0.7, refit_steps=6)
    assert refit.settings["refit_layer_steps"] == 6 and "refit_steps" in refit.settings
    assert "refit_steps" not in plain.settings
    assert [layer.index for layer in refit.layers if layer.action == "replace"] == \
        [layer.index for layer in plain.layers if layer.action == "replace"]
    losses = refit.scores["refit"]
    assert losses and all(values["relative_mse_after"] <= values["relative_mse_before"] for values in losses.values())
    key = next(k for k in refit.factors if k.endswith(".A"))
    assert refit.factors[key].shape == plain.factors[key].shape and not (refit.factors[key] == plain.factors[key]).all()


def test_make_plan_refuses_an_option_no_stage_reads():
    with pytest.raises(TypeError, match="refit_stpes"):
        make_plan(make_model("llama", layers=2, vocab_size=64), random_calibration(2, 8, vocab=64), "grasp-w",
                  ratio=0.2, refit_stpes=3)
