"""One real smollm2-135m artifact per test session, built through the CLI (minutes), shared by the
integration tests that only read it."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("integration") / "smollm2-135m"
    result = subprocess.run(
        [sys.executable, "-P", "-m", "edgecompress.cli", "build", "-o", str(out)],
        capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return out

