"""Structured builds end to end on a tiny model: --structure monarch|blast → plan → MonarchMatMul/BlastMatMul
(lowered for cpu-x86, which does not enable them) → verification against PyTorch with the same modules."""

from __future__ import annotations

import json

import pytest

from edgecompress import api
from tests.helpers import assert_one_line_error, environment_without_data, run_cli

CALIB = dict(calib_sequences=2, calib_seq_len=16)
OPS = {"monarch": "MonarchMatMul", "blast": "BlastMatMul"}


@pytest.fixture(scope="module")
def monarch_artifact(tiny_llama_dir, calibration_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("structured") / "monarch"
    report = api.build(str(tiny_llama_dir), "cpu-x86", out, ratio=0.2, method="grasp-wr", structure="monarch",
                       calibration=calibration_file, eval_limit=0, **CALIB)
    return out, report


def _check_structured_build(out, report, structure, blocks):
    assert report["verification"]["passed"] and report["verification"]["greedy"]["identical"]
    plan = json.loads((out / "plan" / "plan.json").read_text())
    assert plan["settings"]["structure"] == structure and plan["settings"]["blocks"] == blocks
    replaced = [layer for layer in plan["layers"] if layer["action"] == "replace"]
    assert replaced and all(lin["structure"] == structure and lin["blocks"] == blocks
                            for layer in replaced for lin in layer["linears"])
    passes = report["export"]["passes"]
    assert passes["ReplaceLayersPass"]["structured"] == {OPS[structure]: 7 * len(replaced)}
    assert passes["LowerCustomOpsPass"]["lowered"] == {OPS[structure]: 7 * len(replaced)}
    assert 0.1 < report["compression"]["params"]["achieved_ratio"] < 0.35


def test_monarch_build_is_verified_and_records_the_structure(monarch_artifact):
    out, report = monarch_artifact
    _check_structured_build(out, report, "monarch", 4)
    assert report["compression"]["scores"]["refit"]  # grasp-wr refit the Monarch factors


def test_blast_build_is_verified_and_records_the_structure(tiny_llama_dir, calibration_file, tmp_path):
    report = api.build(str(tiny_llama_dir), "cpu-x86", tmp_path / "blast", ratio=0.2, method="grasp-w",
                       structure="blast", blocks=2, calibration=calibration_file, eval_limit=0, **CALIB)
    _check_structured_build(tmp_path / "blast", report, "blast", 2)


def test_a_structured_plan_is_reused(monarch_artifact, tiny_llama_dir, tmp_path):
    out, report = monarch_artifact
    again = api.build(str(tiny_llama_dir), "cpu-x86", tmp_path / "again", plan=out / "plan", eval_limit=0)
    assert "attribute" not in again["timings_s"] and again["compression"]["plan_hash"] == report["compression"]["plan_hash"]
    assert again["verification"]["passed"]
    assert again["export"]["passes"]["ReplaceLayersPass"]["structured"] == report["export"]["passes"]["ReplaceLayersPass"]["structured"]


def test_a_target_with_the_ops_keeps_them_and_runs_them_through_the_library(monarch_artifact, tiny_llama_dir, tmp_path):
    """No lowering where the target enables MonarchMatMul: the graph keeps it, verification runs it in our library
    against PyTorch, and the artifact carries the library."""
    from edgecompress import contract
    from tests.helpers import artifact_ops, custom_ops_library

    custom_ops_library()
    profile = tmp_path / "cpu-structured.toml"
    profile.write_text('name = "cpu-structured"\ndescription = "the CPU with our ops"\ndevice = "cpu"\n'
                       'execution_provider = "CPUExecutionProvider"\ndtype = "float32"\nthreads = 2\n'
                       'custom_ops = ["LowRankMatMul", "MonarchMatMul", "BlastMatMul"]\n')
    out, _ = monarch_artifact
    report = api.build(str(tiny_llama_dir), str(profile), tmp_path / "kept", plan=out / "plan", eval_limit=0)
    assert report["verification"]["passed"] and report["verification"]["greedy"]["identical"]
    structured = report["export"]["passes"]["ReplaceLayersPass"]["structured"]["MonarchMatMul"]
    assert artifact_ops(tmp_path / "kept")[("ai.edgecompress", "MonarchMatMul")] == structured > 0
    assert (tmp_path / "kept" / contract.CUSTOM_OPS_LIBRARY_FILE).is_file()


@pytest.mark.parametrize("args, fragment", [
    (["--structure", "butterfly"], "unknown structure 'butterfly'; use one of lowrank, monarch, blast"),
    (["--blocks", "4"], "--blocks applies to --structure monarch or blast, not lowrank"),
    (["--structure", "monarch", "--blocks", "3", "--method", "grasp-w"], "--blocks 3 does not divide layer 0's"),
])
def test_bad_structure_options_are_one_line_errors(tiny_llama_dir, calibration_file, tmp_path, args, fragment):
    result = run_cli("build", str(tiny_llama_dir), "--ratio", "0.2", "-o", "out", "--calibration", calibration_file,
                     "--calib-sequences", "2", "--calib-seq-len", "16", *args, cwd=tmp_path, env=environment_without_data())
    assert_one_line_error(result, fragment)
    assert result.returncode == 2 and list(tmp_path.iterdir()) == []
