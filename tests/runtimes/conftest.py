"""Fixtures for the runtime tests: a text to score, and a private copy of the tiny artifact to damage."""

from __future__ import annotations

import shutil

import pytest

from tests.tiny_models import WORDS


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory):
    """A few thousand in-vocabulary words, deterministic, with line breaks and punctuation."""
    import random

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + " ." for _ in range(200)]
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def artifact_copy(tiny_llama_artifact, tmp_path):
    folder, _ = tiny_llama_artifact
    copy = tmp_path / "artifact"
    shutil.copytree(folder, copy)
    return copy
