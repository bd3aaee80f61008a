"""`edgecompress profile` end to end on the tiny artifact: metric keys and their arithmetic, the
interleaving order, IO binding on CPU, the output folder, memory, and --compare's Δ %."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from edgecompress.runtimes.profiler import SCHEMA, ProfileSettings, profile_artifact, profile_artifacts
from edgecompress.runtimes.profiler.compare import compare, delta_pct
from edgecompress.runtimes.profiler.loop import Runner, token_ids
from edgecompress.runtimes.profiler.settings import Shape, parse_list
from edgecompress.runtimes.profiler.stats import KEYS
from edgecompress.runtimes.session import create_session

REPS = 3
SETTINGS = dict(n_prompt=[8], n_gen=[4], depth=[0, 16], pg=[(8, 5)], repetitions=REPS, threads=1, ops_steps=3)
EXPECTED_TESTS = ["pp8", "tg4", "pp8+tg5", "pp8 @ d16", "tg4 @ d16", "pp8+tg5 @ d16"]


@pytest.fixture(scope="module")
def profiled(tiny_llama_artifact, tmp_path_factory):
    folder, _ = tiny_llama_artifact
    out = tmp_path_factory.mktemp("profile") / "out"
    result = profile_artifact(folder, ProfileSettings(**SETTINGS), out=out)
    return result, out


def _tests(result) -> dict:
    return {row["key"]: row for row in result["tests"]}


def test_tests_are_named_as_llama_bench_names_them(profiled):
    result, _ = profiled
    assert [row["key"] for row in result["tests"]] == EXPECTED_TESTS
    assert result["schema"] == SCHEMA


def test_every_metric_has_its_statistics_and_they_are_ordered(profiled):
    for row in profiled[0]["tests"]:
        for metric in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
            summary = row[metric]
            if summary is None:
                continue
            assert set(KEYS) <= set(summary)
            assert 0 < summary["min"] <= summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]
            assert summary["min"] <= summary["mean"] <= summary["max"] and summary["std"] >= 0
    tests = _tests(profiled[0])
    assert tests["pp8"]["itl_ms"] is None and tests["pp8"]["tpot_ms"] is None
    assert tests["tg4"]["ttft_ms"] is None and tests["tg4"]["prefill_tps"] is None


def test_sample_counts_follow_the_test_shapes(profiled):
    tests = _tests(profiled[0])
    assert tests["pp8"]["ttft_ms"]["n"] == REPS
    assert tests["tg4 @ d16"]["itl_ms"]["n"] == REPS * 4  # four timed decode steps after the untimed depth
    assert tests["pp8+tg5"]["itl_ms"]["n"] == REPS * 4  # the prefill gives the first of the five tokens
    assert np.asarray(tests["pp8+tg5"]["itl_ms"]["samples"]).shape == (REPS, 4)  # [rep][step]
    assert tests["pp8+tg5"]["tpot_ms"]["n"] == REPS


def test_tpot_and_throughputs_follow_from_the_samples(profiled):
    row = _tests(profiled[0])["pp8+tg5"]
    ttft, e2e, itl = row["ttft_ms"]["samples"], row["e2e_ms"]["samples"], row["itl_ms"]["samples"]
    for rep in range(REPS):
        assert row["tpot_ms"]["samples"][rep] == pytest.approx((e2e[rep] - ttft[rep]) / (5 - 1))
        assert e2e[rep] >= ttft[rep] + sum(itl[rep]) - 1e-6  # e2e is wall time around every timed call
    assert row["prefill_tps"] == pytest.approx(8 / (row["ttft_ms"]["mean"] / 1e3))
    assert row["decode_tps"] == pytest.approx(1 / (row["itl_ms"]["mean"] / 1e3))
    assert row["e2e_tps"] == pytest.approx(5 / (row["e2e_ms"]["mean"] / 1e3))
    tg = _tests(profiled[0])["tg4"]
    for rep in range(REPS):  # decode-only: TPOT = e2e / n_gen
        assert tg["tpot_ms"]["samples"][rep] == pytest.approx(tg["e2e_ms"]["samples"][rep] / 4)


def test_repetitions_are_interleaved_round_by_round(profiled):
    schedule = profiled[0]["schedule"]
    assert [(s["rep"], s["test"]) for s in schedule] == [(r, t) for r in range(REPS) for t in EXPECTED_TESTS]


def test_load_and_first_run_are_reported_apart_and_p99_is_flagged(profiled):
    result = profiled[0]
    assert result["load_ms"] > 0 and result["first_run_ms"] > 0
    assert result["settings"]["warmup"] == 1 and result["settings"]["warmup_shape"] == "pp24+tg5"
    assert any("pp8:" in w and "fewer than 100" in w for w in result["warnings"])


def test_memory_is_measured_per_phase_with_its_source(profiled):
    result = profiled[0]
    assert result["memory"]["source"][0] in ("vmhwm", "ru_maxrss")
    for row in result["tests"]:
        assert row["memory"]["host_rss_prefill_peak_mb"] > 0
        assert row["memory"]["source"][0] == result["memory"]["source"][0]  # nvml joins it where a GPU is
    assert _tests(result)["tg4"]["memory"]["host_rss_decode_peak_mb"] > 0


def test_roofline_estimates_are_labelled_and_use_the_test_shape(profiled):
    result = profiled[0]
    roof = result["roofline"]
    assert roof["target"] == "cpu-x86" and roof["bw_source"] == "profile" and "estimate" in roof["label"]
    decode = _tests(result)["tg4 @ d16"]["roofline"]["decode"]
    assert "estimate" in decode["label"] and decode["past"] == 16 + (4 - 1) / 2
    assert decode["measured_ms"] == pytest.approx(_tests(result)["tg4 @ d16"]["itl_ms"]["mean"])
    assert decode["est_ms"] == pytest.approx(max(decode["t_mem_est_ms"], decode["t_compute_est_ms"]))


def test_the_output_folder_holds_every_file(profiled):
    result, out = profiled
    on_disk = json.loads((out / "profile.json").read_text())
    assert on_disk["schema"] == SCHEMA and on_disk["tests"] == json.loads(json.dumps(result["tests"]))
    assert on_disk["ops"]["trace"] == "ort_trace.json"
    assert isinstance(json.loads((out / "ort_trace.json").read_text()), list)
    markdown = (out / "profile.md").read_text()
    assert "| pp8+tg5 @ d16 |" in markdown and "estimated" in markdown
    assert (out / "profile.csv").read_text().startswith("artifact,test,batch")
    assert (out / "profile.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_io_binding_on_cpu_gives_the_same_tokens(tiny_llama_artifact):
    folder, _ = tiny_llama_artifact
    shape = Shape(8, 4)
    ids = token_ids(shape, 64, 0)
    tokens = []
    for bound in (False, True):
        runner = Runner(create_session(folder, threads=1), io_binding=bound)
        runner.reset(1)
        step, seen = runner.step(ids[:, :8]), []
        for _ in range(4):
            seen.append(int(step.tokens[0]))
            step = runner.step(step.tokens[:, None])
        assert step.run_ns > 0 and step.total_ns >= step.run_ns
        tokens.append(seen)
    assert tokens[0] == tokens[1]


def test_several_artifacts_interleave_and_io_binding_is_recorded(tiny_llama_artifact):
    folder, _ = tiny_llama_artifact
    settings = ProfileSettings(n_prompt=[4], n_gen=[2], repetitions=2, warmup=0, ops=False, memory=False,
                               io_binding=True, threads=1)
    results = profile_artifacts([folder, folder], settings)
    assert [(s["rep"], s["test"], s["artifact"]) for s in results[0]["schedule"]] == [
        (r, t, a) for r in range(2) for t in ("pp4", "tg2") for a in (0, 1)]
    assert all(r["settings"]["io_binding"] for r in results) and results[0]["ops"] is None
    assert any("no warm-up" in w for w in results[0]["warnings"])


def test_a_batch_counts_every_sequence_in_its_throughputs(tiny_llama_artifact):
    folder, _ = tiny_llama_artifact
    settings = ProfileSettings(n_prompt=[4], n_gen=[3], batch=[2], repetitions=2, ops=False, memory=False, threads=1)
    [result] = profile_artifacts([folder], settings)
    pp, tg = result["tests"]
    assert (pp["key"], tg["key"]) == ("pp4 b2", "tg3 b2")
    assert pp["prefill_tps"] == pytest.approx(2 * 4 / (pp["ttft_ms"]["mean"] / 1e3))
    assert tg["decode_tps"] == pytest.approx(2 / (tg["itl_ms"]["mean"] / 1e3))


def test_prompt_tokens_can_come_from_a_text(tiny_llama_artifact, tiny_text):
    folder, _ = tiny_llama_artifact
    settings = ProfileSettings(n_prompt=[8], n_gen=[2], repetitions=1, ops=False, memory=False, threads=1,
                               prompt_text=str(tiny_text))
    [result] = profile_artifacts([folder], settings)
    assert result["settings"]["prompt"] == f"text {tiny_text}" and result["settings"]["tokenize_ms"] > 0
    assert result["memory"] is None and result["tests"][0]["memory"] is None


def test_compare_gives_the_percent_change_per_matching_test(profiled):
    current = profiled[0]
    baseline = copy.deepcopy(current)
    row = baseline["tests"][1]
    row["itl_ms"]["mean"] *= 2
    row["decode_tps"] /= 2
    baseline["tests"] = baseline["tests"][:2]
    baseline["settings"]["threads"] = 4
    comp = compare(current, baseline, "base.json")
    by = {(r["test"], r["metric"]): r for r in comp["rows"]}
    assert by[("tg4", "itl_ms.mean")]["delta_pct"] == pytest.approx(-50.0)
    assert by[("tg4", "decode_tps")]["delta_pct"] == pytest.approx(100.0)
    assert by[("pp8", "ttft_ms.mean")]["delta_pct"] == pytest.approx(0.0)
    assert comp["unmatched"] == EXPECTED_TESTS[2:] and comp["settings_differ"] == {"threads": [4, 1]}
    assert delta_pct(90.0, 100.0) == pytest.approx(-10.0) and delta_pct(1.0, 0.0) is None


def test_lists_take_llama_bench_ranges():
    assert parse_list("128-512*2", "-p") == [128, 256, 512]
    assert parse_list("0,8-16+4", "-d") == [0, 8, 12, 16]
    assert token_ids(Shape(8, 4), 64, 0).tolist() == token_ids(Shape(8, 4), 64, 0).tolist()
