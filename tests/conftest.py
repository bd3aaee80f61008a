"""Shared fixtures: tiny random models saved as HF folders, and artifacts built from them.

Tests never use the network: the Hugging Face libraries are put offline before anything imports them
(subprocesses inherit it), so the `datasets` route of the data sources only sees the local cache.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402

from tests.tiny_models import save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2")


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory):
    """Calibration text in the tiny models' vocabulary (two windows of 16 tokens and more)."""
    from tests.tiny_models import WORDS

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(WORDS * 6) + " .\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_artifact(tiny_llama_dir, tmp_path_factory):
    """One built and verified artifact, shared by the tests that only read it."""
    from edgecompress import api

    out = tmp_path_factory.mktemp("artifacts") / "tiny-llama-cpu"
    report = api.build(str(tiny_llama_dir), "cpu-x86", out)
    return out, report
