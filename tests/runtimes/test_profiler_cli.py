"""`edgecompress profile` on the command line: every bad input is one line and exit 2 with nothing
written, the printed formats, and the import rule that lets the profiler run on a bare device."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import onnxruntime as ort
import pytest

from tests.helpers import assert_one_line_error, run_cli

FAST = ["-p", "8", "-n", "3", "-r", "2", "-t", "1", "--ops-steps", "2"]


def _damage(folder, kind: str) -> None:
    if kind == "missing":
        (folder / "tokenizer.json").unlink()
    else:  # same size, other bytes: only the sha256 can tell
        data = bytearray((folder / "config.json").read_bytes())
        data[2] ^= 0x01
        (folder / "config.json").write_bytes(bytes(data))


@pytest.mark.parametrize("kind, fragment", [("missing", "'tokenizer.json' is missing"),
                                            ("altered", "does not match its sha256")])
def test_missing_or_altered_files_are_refused(artifact_copy, tmp_path, kind, fragment):
    _damage(artifact_copy, kind)
    result = run_cli("profile", str(artifact_copy), *FAST, "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()


def _bad_inputs(folder, tmp_path) -> list[tuple[list[str], str]]:
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not json")
    cases = [
        ([str(tmp_path / "nowhere")], "is not an artifact folder"),
        ([str(tmp_path)], "is not an edgecompress artifact"),
        ([str(folder), "--target", "no-such-device"], "unknown target 'no-such-device'"),
        ([str(folder), "--format", "xml"], "--format must be one of md, json, csv"),
        ([str(folder), "--compare", str(a_file)], "is not valid JSON"),
        ([str(folder), "-o", str(a_file)], "exists and is not a folder"),
        ([str(folder), "-p", "300"], "the model's context is 256 tokens"),
        ([str(folder), "-p", "1-x"], "takes integers"),
        ([str(folder), "--pg", "8"], "--pg takes PROMPT,GEN"),
        ([str(folder), "--prompt-text", str(tmp_path / "no-such.txt")], "does not exist"),
    ]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        cases.append(([str(folder), "--ep", "cuda"], "CUDAExecutionProvider (--ep) is not available"))
    return cases


def test_every_bad_input_is_one_line_and_exit_2(tiny_llama_artifact, tmp_path):
    folder, _ = tiny_llama_artifact
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for args, fragment in _bad_inputs(folder, inputs):
        out = tmp_path / "out"
        # the case's own options come last: they win over FAST's
        result = run_cli("profile", args[0], *FAST, *args[1:], *([] if "-o" in args else ["-o", str(out)]))
        assert result.returncode == 2, (args, result.stderr)
        assert_one_line_error(result, fragment)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_prints_json_and_csv_and_compares_with_a_baseline(tiny_llama_artifact, tmp_path):
    folder, _ = tiny_llama_artifact
    first = run_cli("profile", str(folder), *FAST, "--no-ops", "--format", "json", "-o", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    printed = json.loads(first.stdout)
    assert [t["key"] for t in printed["tests"]] == ["pp8", "tg3"] and printed["ops"] is None
    second = run_cli("profile", str(folder), *FAST, "--no-ops", "--format", "csv",
                     "--compare", str(tmp_path / "a" / "profile.json"), "-o", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    rows = list(csv.DictReader(io.StringIO(second.stdout)))
    assert [r["test"] for r in rows] == ["pp8", "tg3"] and float(rows[1]["itl_ms_mean"]) > 0
    base = json.loads((tmp_path / "a" / "profile.json").read_text())
    now = json.loads((tmp_path / "b" / "profile.json").read_text())
    delta = {(r["test"], r["metric"]): r["delta_pct"] for r in now["compare"]["rows"]}
    expected = (now["tests"][1]["itl_ms"]["mean"] / base["tests"][1]["itl_ms"]["mean"] - 1) * 100
    assert delta[("tg3", "itl_ms.mean")] == pytest.approx(expected)
    assert "## Compared with" in (tmp_path / "b" / "profile.md").read_text()


IMPORT_RULE = """
import sys
base = set(sys.modules)
import onnxruntime, numpy, tokenizers
runtime = set(sys.modules)
import edgecompress.runtimes.profiler
from edgecompress.runtimes.profiler import (artifact, assemble, compare, fingerprint, loop, memory, onnx_graph,
    ops, outputs, plot, predict, results, roofline, roles, run, settings, stats)
stdlib = sys.stdlib_module_names
extra = sorted(m for m in set(sys.modules) - runtime if m.split('.')[0] not in stdlib)
print('\\n'.join(extra))
"""


def test_the_profiler_imports_only_onnxruntime_numpy_and_tokenizers():
    """What importing the profiler adds beyond the standard library and what onnxruntime, numpy and
    tokenizers load themselves must be edgecompress's own modules (pynvml, matplotlib: only when used)."""
    result = subprocess.run([sys.executable, "-P", "-c", IMPORT_RULE], capture_output=True, text=True, check=True)
    extra = result.stdout.split()
    assert "edgecompress.runtimes.profiler.run" in extra
    assert [m for m in extra if not m.startswith("edgecompress")] == []
    assert not {"torch", "transformers", "onnx", "onnx_ir", "matplotlib", "pynvml"} & set(extra)
