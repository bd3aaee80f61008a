"""A build killed with SIGKILL cannot clean up: the next build into OUT, or `edgecompress clean OUT`,
removes what it left beside OUT once its process is gone (issue 23)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from edgecompress import artifact
from edgecompress.contract import MODEL_FILE
from tests.helpers import run_cli

# The build's last stage writes the manifest of the finished staging folder: kill the process there,
# when the folder holds the whole model, the way SIGKILL during the save would.
KILLED_DURING_SAVE = """
import os, signal, sys
from edgecompress import api, artifact
artifact.manifest = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
api.build(sys.argv[1], "cpu-x86", sys.argv[2], force=True, eval_limit=0)
"""


def kill_a_build(model: Path, out: Path) -> list[Path]:
    done = subprocess.run([sys.executable, "-P", "-c", KILLED_DURING_SAVE, str(model), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    return sorted(out.parent.glob(f".{out.name}.*"))


def test_the_next_build_removes_what_a_killed_build_left(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    left = kill_a_build(tiny_llama_dir, out)
    partial = [entry for entry in left if entry.is_dir()]
    assert len(partial) == 1 and partial[0].name.startswith(".out.partial-"), left
    assert (partial[0] / MODEL_FILE).is_file()  # killed with the model saved: the whole model is there
    owner = json.loads(Path(f"{partial[0]}{artifact.OWNER_SUFFIX}").read_text())
    assert owner["host"] and owner["pid"] != os.getpid()
    assert not out.exists()

    result = run_cli("build", str(tiny_llama_dir), "-o", str(out), "--eval-limit", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "removed 1 folder(s) left beside" in result.stderr.replace("\n", " ")
    assert partial[0].name in result.stderr.replace("\n", "")
    assert sorted(tmp_path.glob(".out.*")) == []
    assert (out / MODEL_FILE).is_file()
    assert not any(name.endswith(artifact.OWNER_SUFFIX) for name in os.listdir(out))


def test_clean_removes_dead_leftovers_and_keeps_live_and_unknown_ones(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    dead = [entry for entry in kill_a_build(tiny_llama_dir, out) if entry.is_dir()]
    live = artifact._make_owned_folder(".out.partial-", tmp_path)  # this test's process is alive
    unknown = tmp_path / ".out.partial-old"  # no owner record
    unknown.mkdir()
    other = tmp_path / ".other.partial-x"  # another OUT's folder is never touched
    other.mkdir()

    result = run_cli("clean", str(out))
    assert result.returncode == 0, result.stderr
    text = result.stdout.replace("\n", " ")
    assert "removed 1 leftover folder(s)" in text and "1 with no owner record kept" in text
    assert not dead[0].exists() and not Path(f"{dead[0]}{artifact.OWNER_SUFFIX}").exists()
    assert live.is_dir() and unknown.is_dir() and other.is_dir()

    assert run_cli("clean", str(out), "--unknown-owner").returncode == 0
    assert not unknown.exists() and live.is_dir() and other.is_dir()
    assert "nothing left" in run_cli("clean", str(out)).stdout


def test_a_reused_pid_is_not_a_live_owner(tmp_path):
    folder = artifact._make_owned_folder(".out.partial-", tmp_path)
    owner_file = Path(f"{folder}{artifact.OWNER_SUFFIX}")
    owner = json.loads(owner_file.read_text())
    assert artifact._owner_alive(owner_file) is True
    owner_file.write_text(json.dumps({**owner, "start": "1"}))  # same pid, another process start
    assert artifact._owner_alive(owner_file) is False
    owner_file.write_text(json.dumps({**owner, "host": owner["host"] + "-elsewhere"}))
    assert artifact._owner_alive(owner_file) is None
