"""The command line: help, bad input (one line, non-zero exit, no traceback, nothing written), -v."""

from __future__ import annotations

import json

import pytest

from tests.helpers import assert_one_line_error, run_cli


@pytest.mark.parametrize("verb", ["build", "inspect", "targets"])
def test_help_documents_every_verb(verb):
    result = run_cli(verb, "--help")
    assert result.returncode == 0
    assert "--verbose" in result.stdout and "--quiet" in result.stdout


def test_build_help_lists_its_options():
    text = run_cli("build", "--help").stdout
    for option in ("--target", "--out", "--force", "--revision", "--trust-remote-code", "smollm2-135m", "--structure",
                   "--blocks"):
        assert option in text


def test_missing_model_path(tmp_path):
    result = run_cli("build", str(tmp_path / "missing"), "-o", str(tmp_path / "out"))
    assert_one_line_error(result, "does not exist")
    assert not (tmp_path / "out").exists()


def test_folder_that_is_not_a_model(tmp_path):
    result = run_cli("build", str(tmp_path), "-o", str(tmp_path / "out"))
    assert_one_line_error(result, "not a Hugging Face model folder")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00truncated")
    result = run_cli("build", str(bad), "-o", str(tmp_path / "out"))
    assert_one_line_error(result, "corrupt or truncated GGUF")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    result = run_cli("build", str(tmp_path), "-o", str(tmp_path / "out"))
    assert_one_line_error(result, "supported: llama, mistral, qwen2")


def test_unknown_target_lists_valid_ones(tiny_llama_dir, tmp_path):
    result = run_cli("build", str(tiny_llama_dir), "--target", "toaster", "-o", str(tmp_path / "out"))
    assert_one_line_error(result, "unknown target 'toaster'; valid targets: a40, cpu-x86, h100, jetson-agx-orin, "
                          "jetson-orin-nano, jetson-orin-nano-super, jetson-orin-nx, l4, rtx-4090, jetson-orin (or a .toml file)")
    assert not (tmp_path / "out").exists()


def test_unwritable_output(tiny_llama_dir):
    target = "/proc/edgecompress-out"  # writable for nobody, root included (permission bits are not)
    result = run_cli("build", str(tiny_llama_dir), "-o", target)
    assert_one_line_error(result, "not writable")
    assert result.returncode == 2


def test_existing_output_without_force(tiny_llama_dir, tmp_path):
    (tmp_path / "out").mkdir()
    result = run_cli("build", str(tiny_llama_dir), "-o", str(tmp_path / "out"))
    assert_one_line_error(result, "--force")


def test_verbose_shows_the_traceback(tmp_path):
    result = run_cli("build", str(tmp_path / "missing"), "-v")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "does not exist" in result.stderr


def test_targets_lists_cpu_x86():
    result = run_cli("targets", "--json")
    assert result.returncode == 0
    names = [p["name"] for p in json.loads(result.stdout)]
    assert "cpu-x86" in names


def test_inspect_json(tiny_llama_artifact):
    out, _ = tiny_llama_artifact
    result = run_cli("inspect", str(out), "--json")
    assert result.returncode == 0
    info = json.loads(result.stdout)
    assert info["layers"] == 3 and info["build"]["verification_passed"] is True


def test_inspect_missing_artifact(tmp_path):
    assert_one_line_error(run_cli("inspect", str(tmp_path)), "not an edgecompress artifact")


def test_build_prints_a_summary(tiny_llama_dir, tmp_path):
    result = run_cli("build", str(tiny_llama_dir), "-o", str(tmp_path / "art"))
    assert result.returncode == 0, result.stderr
    assert "artifact" in result.stdout and "parity" in result.stdout and "passed" in result.stdout
    quiet = run_cli("build", str(tiny_llama_dir), "-o", str(tmp_path / "art2"), "-q")
    assert quiet.returncode == 0 and quiet.stdout.strip().endswith("art2")
