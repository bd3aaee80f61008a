"""The real model: `edgecompress build` with no MODEL builds the embedded smollm2-135m (minutes)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_default_build_of_smollm2_passes_parity_and_greedy(smollm2_artifact):
    """The fixture runs `edgecompress build -o OUT` with no MODEL: the embedded default."""
    out = smollm2_artifact
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["spec"] == "smollm2-135m" and report["source"]["kind"] == "alias"
    assert report["model"]["num_layers"] == 30 and report["model"]["parameters"] == 134_515_008
    verification = report["verification"]
    assert verification["passed"] is True
    assert verification["greedy"]["identical"] is True
    assert len(verification["greedy"]["pytorch"]) == 16
    for check in verification["checks"]:
        assert check["passed"], check
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 30 and genai["model"]["type"] == "llama"
    # 134.5M fp32 parameters, tied embedding stored once.
    assert 530e6 < (out / "model.onnx.data").stat().st_size < 560e6
