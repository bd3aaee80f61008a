"""Compressed builds end to end on a tiny model: plan → passes → verification against torch-with-plan."""

from __future__ import annotations

import json

import pytest

from edgecompress import api
from edgecompress.errors import EdgeCompressError
from tests.helpers import assert_one_line_error, environment_without_data, run_cli
from tests.tiny_models import WORDS

CALIB = dict(calib_sequences=2, calib_seq_len=16)


@pytest.fixture(scope="module")
def evaluation_file(tmp_path_factory):
    """Text built here, enough for the build's default 40 windows of 512 tokens of the tiny vocabulary."""
    import random

    rng = random.Random(1)
    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(20)) + " ." for _ in range(1100)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def grasp_artifact(tiny_llama_dir, calibration_file, evaluation_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("compressed") / "grasp"
    report = api.build(str(tiny_llama_dir), "cpu-x86", out, ratio=0.2, method="grasp",
                       calibration=calibration_file, eval_data=evaluation_file, **CALIB)
    return out, report


def test_grasp_build_is_verified_and_smaller(grasp_artifact):
    out, report = grasp_artifact
    assert report["verification"]["passed"] and report["verification"]["greedy"]["identical"]
    params = report["compression"]["params"]
    assert 0.1 < params["achieved_ratio"] < 0.35
    replaced = [layer for layer in report["compression"]["layers"] if layer["action"] == "replace"]
    assert replaced and all(len(layer["linears"]) == 7 for layer in replaced)
    counts = report["export"]["passes"]["ReplaceLayersPass"]
    assert counts["modified"] and counts["matmuls_split"] == 7 * len(replaced)
    assert counts["params_after"] < counts["params_before"]
    assert (out / "plan" / "plan.json").is_file() and (out / "plan" / "factors.safetensors").is_file()
    assert "plan/plan.json" in report["manifest"]


def test_shortgpt_removes_layers_and_renumbers_the_cache(tiny_llama_dir, calibration_file, tmp_path):
    report = api.build(str(tiny_llama_dir), "cpu-x86", tmp_path / "short", ratio=0.25, method="shortgpt",
                       calibration=calibration_file, **CALIB)
    removed = [layer["index"] for layer in report["compression"]["layers"] if layer["action"] == "remove"]
    assert removed and report["verification"]["passed"]
    genai = json.loads((tmp_path / "short" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 3 - len(removed)
    info = api.inspect(tmp_path / "short")
    kv_inputs = sorted(v["name"] for v in info["inputs"] if v["name"].startswith("past_key_values."))
    assert kv_inputs == sorted(f"past_key_values.{i}.{k}" for i in range(3 - len(removed)) for k in ("key", "value"))


def test_saved_plan_is_reused_without_attribution(grasp_artifact, tiny_llama_dir, tmp_path):
    out, report = grasp_artifact
    again = api.build(str(tiny_llama_dir), "cpu-x86", tmp_path / "again", plan=out / "plan")
    assert "attribute" not in again["timings_s"] and "calibrate" not in again["timings_s"]
    assert again["compression"]["plan_hash"] == report["compression"]["plan_hash"]
    assert again["verification"]["passed"]


def test_plan_for_another_model_is_refused(grasp_artifact, tiny_qwen2_dir, tmp_path):
    out, _ = grasp_artifact
    with pytest.raises(EdgeCompressError, match="plan was made for model weights"):
        api.build(str(tiny_qwen2_dir), "cpu-x86", tmp_path / "wrong", plan=out / "plan")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
def test_ratio_outside_the_open_interval(tiny_llama_dir, tmp_path, ratio):
    with pytest.raises(EdgeCompressError, match="ratio"):
        api.build(str(tiny_llama_dir), "cpu-x86", tmp_path / "out", ratio=ratio)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_ratio(tiny_llama_dir, calibration_file, tmp_path):
    with pytest.raises(EdgeCompressError, match="out of reach"):
        api.build(str(tiny_llama_dir), "cpu-x86", tmp_path / "out", ratio=0.95, method="shortgpt",
                  calibration=calibration_file, **CALIB)
    assert list(tmp_path.iterdir()) == []


def test_calibration_shorter_than_one_sequence(tiny_llama_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the sky is blue")
    with pytest.raises(EdgeCompressError, match="shorter than one sequence of 16"):
        api.build(str(tiny_llama_dir), "cpu-x86", tmp_path / "out", ratio=0.2, calibration=str(short), **CALIB)
    assert not (tmp_path / "out").exists()


def test_unknown_method(tiny_llama_dir, tmp_path):
    with pytest.raises(EdgeCompressError, match="unknown method"):
        api.build(str(tiny_llama_dir), "cpu-x86", tmp_path / "out", ratio=0.2, method="magic")


def test_compressed_build_reports_its_perplexity(grasp_artifact, evaluation_file):
    out, report = grasp_artifact
    evaluation = report["evaluation"]
    assert evaluation["windows"] == 40 and evaluation["settings"]["seq_len"] == 512
    assert evaluation["settings"]["data"] == evaluation_file and "evaluate" in report["timings_s"]
    # The number in the report is the artifact's perplexity on those windows, measured again here.
    again = api.eval(out, evaluation_file, limit=40, seq_len=512)
    assert evaluation["perplexity"] == pytest.approx(again["perplexity"], rel=1e-6)
    assert evaluation["mean_nll"] == pytest.approx(again["mean_nll"], rel=1e-6)


def test_dense_build_skips_evaluation_unless_asked(tiny_llama_artifact):
    _, report = tiny_llama_artifact
    assert report["evaluation"] is None and "evaluate" not in report["timings_s"]


def test_compressed_build_on_a_machine_without_data(tiny_llama_dir, tmp_path):
    """A fresh clone or a user's machine: no EDGECOMPRESS_DATA, no cached dataset, an empty working
    directory. The build calibrates on self-generated text, says so, and records it in the plan."""
    work = tmp_path / "empty"
    work.mkdir()
    env = environment_without_data(HF_HOME=str(tmp_path / "hf-home"))
    result = run_cli("build", str(tiny_llama_dir), "--ratio", "0.2", "--calib-sequences", "2", "--calib-seq-len",
                     "16", "-o", "art", cwd=work, env=env)
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "self-generated" in result.stderr
    plan = json.loads((work / "art" / "plan" / "plan.json").read_text())
    assert plan["calibration"]["source"] == "self:2" and "EDGECOMPRESS_DATA" in plan["calibration"]["fallback"]
    report = json.loads((work / "art" / "report.json").read_text())
    assert report["warnings"] == [plan["calibration"]["fallback"]]
    assert report["evaluation"]["skipped"].startswith("no evaluation text given")
    assert sorted(p.name for p in work.iterdir()) == ["art"]


@pytest.mark.parametrize("args, fragment", [
    (["--calibration", "missing.txt"], "calibration text 'missing.txt' does not exist"),
    (["--calibration", "self:0"], "self:N"),
    (["--calibration", "hf:no-such-dataset:validation"], "cannot load dataset hf:no-such-dataset:validation"),
    (["--eval-data", "missing.txt", "--eval-limit", "2"], "evaluation text 'missing.txt' does not exist"),
    (["--calib-sequences", "4", "--calib-holdout", "4"], "--calib-holdout 4 needs more fitting windows than that"),
    (["--calib-holdout", "-1"], "--calib-holdout must be 0 or a number of windows"),
])
def test_bad_data_sources_are_one_line_errors(tiny_llama_dir, tmp_path, args, fragment):
    result = run_cli("build", str(tiny_llama_dir), "--ratio", "0.2", "-o", "out", *args, cwd=tmp_path,
                     env=environment_without_data())
    assert_one_line_error(result, fragment)
    assert result.returncode == 2 and list(tmp_path.iterdir()) == []


def test_data_folder_without_the_files_is_refused(tiny_llama_dir, tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    result = run_cli("build", str(tiny_llama_dir), "--ratio", "0.2", "-o", str(tmp_path / "out"),
                     env=environment_without_data(EDGECOMPRESS_DATA=str(empty)))
    assert_one_line_error(result, f"EDGECOMPRESS_DATA={empty} has no wiki.test.raw")
    assert result.returncode == 2 and not (tmp_path / "out").exists()
