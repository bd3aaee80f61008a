"""The real model compressed end to end: `build --ratio 0.2 --weights int4` (GRASP plan, graph passes,
exact GGUF int4 blocks for the dense layers, fusions by the target's default), verified, with
perplexity in the report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import require_wikitext

pytestmark = pytest.mark.integration


def test_grasp_20_percent_int4_fused_smollm2(tmp_path):
    require_wikitext()
    out = tmp_path / "smollm2-grasp20-int4"
    # Faithful GRASP on 4 calibration sequences keeps the test to minutes (the default method's refits would
    # add ~5 on these 2 cores; tests/attribution/test_refit.py builds the default on tiny models).
    command = [sys.executable, "-P", "-m", "edgecompress.cli", "build", "smollm2-135m", "-o", str(out), "--ratio", "0.2",
               "--method", "grasp", "--weights", "int4", "--calib-sequences", "4", "--eval-limit", "4"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())

    compression = report["compression"]
    assert compression["method"] == "grasp" and 0.18 < compression["params"]["achieved_ratio"] < 0.22
    replaced = [layer["index"] for layer in compression["layers"] if layer["action"] == "replace"]
    assert len(replaced) == 8 and (out / "plan" / "plan.json").is_file()
    assert report["verification"]["passed"] and report["verification"]["greedy"]["identical"]

    optimized = report["verification"]["optimized"]
    assert optimized["passed"] and optimized["weights"] == "int4" and report["weights"]["fuse"] is True
    steps = report["export"]["optimize"]
    gguf = steps["weights"]["MapGgufWeightsPass"]
    assert gguf["matmuls_mapped"] == {"Q4_1": 7 * (30 - 8), "Q8_0": 1} and gguf["max_abs_diff"] == 0.0
    assert steps["weights"]["QuantizeWeightsPass"]["matmuls_quantized"] == 2 * 7 * 8  # both factors
    assert steps["fusion"]["FuseGroupQueryAttentionPass"]["fused"] == 30

    evaluation = report["evaluation"]
    assert evaluation["windows"] == 4 and evaluation["perplexity"] < 4 * evaluation["fp32_export"]["perplexity"]
    assert abs(evaluation["ratio_to_fp32"] - 1) < 0.1  # int4 on top of the compressed fp32 export
    # fp32 export 538 MB; here the fp32 embedding (113 MB, read one row per token) plus int4 everything else.
    assert (out / "model.onnx.data").stat().st_size < 215e6

    # The fused int4 artifact still drops into onnxruntime-genai: same greedy tokens as our runtime.
    og = pytest.importorskip("onnxruntime_genai")  # noqa: F841
    from edgecompress.runtimes.generate import TextGenerator
    from tests.runtimes.genai_reference import genai_greedy, without_eos

    generator = TextGenerator(out, threads=2)
    prompt = "The three most important inventions of the twentieth century are"
    # Plain continuation: with the chat template this compressed 135M model answers with eos at once.
    ours = without_eos(generator.generate(prompt, 16, chat=False).tokens, generator.eos_ids)
    theirs, _ = genai_greedy(out, generator.encode(prompt, chat=False), 16)
    assert ours == theirs and len(ours) == 16
