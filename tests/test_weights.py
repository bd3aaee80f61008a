"""quantize_artifact / fuse_artifact on a copy of the tiny built artifact: files rewritten, still runs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgecompress.errors import EdgeCompressError
from edgecompress.weights import fuse_artifact, quantize_artifact


@pytest.fixture
def artifact(tiny_llama_artifact, tmp_path):
    folder = tmp_path / "artifact"
    shutil.copytree(tiny_llama_artifact[0], folder)
    return folder


def _logits(folder) -> np.ndarray:
    from edgecompress.runtimes.decoder import OrtDecoder

    decoder = OrtDecoder(folder)
    ids = np.array([[3, 5, 7, 9, 11, 13]], dtype=np.int64)
    out = decoder.forward(ids, np.ones_like(ids), np.arange(6, dtype=np.int64)[None], decoder.empty_cache(1))
    return out[0]


@pytest.mark.parametrize("weights,bits", [("int4", 4), ("int8", 8)])
def test_quantize_then_fuse_rewrites_the_artifact_in_place(artifact, weights, bits):
    import onnx_ir as ir

    dense = _logits(artifact)
    size_before = (artifact / "model.onnx.data").stat().st_size

    counts = quantize_artifact(artifact, weights, block_size=32)
    fused = fuse_artifact(artifact)

    stats = counts["QuantizeWeightsPass"]
    assert stats["matmuls_quantized"] == 3 * 7 + 1 and stats["lm_head_quantized"]
    assert fused["FuseOrtOpsPass"]["fused_ops"]["SkipSimplifiedLayerNormalization"] == 6
    assert (artifact / "model.onnx.data").stat().st_size < size_before
    assert not list(artifact.glob(".*.new"))  # the temporary files were swapped in
    model = ir.load(str(artifact / "model.onnx"))
    nodes = [node for node in model.graph if node.op_type == "MatMulNBits"]
    assert len(nodes) == 22 and {node.attributes.get_int("bits") for node in nodes} == {bits}
    logits = _logits(artifact)
    assert logits.shape == dense.shape and np.isfinite(logits).all()
    drift = np.abs(logits - dense).max() / np.abs(dense).max()
    assert drift < (0.3 if bits == 4 else 0.03)  # the tiny model's random weights: see the pass tests


def test_fp32_is_a_no_op(artifact):
    before = (artifact / "model.onnx").read_bytes()
    assert quantize_artifact(artifact, "fp32") == {"weights": "fp32"}
    assert (artifact / "model.onnx").read_bytes() == before


@pytest.mark.parametrize("kwargs,message", [
    ({"weights": "int3"}, "unknown weight format"),
    ({"weights": "int4", "block_size": 48}, "block size must be one of"),
    ({"weights": "int4", "source_gguf": "/nonexistent/model.gguf"}, "does not exist"),
])
def test_bad_format_is_refused_before_touching_the_artifact(artifact, kwargs, message):
    before = (artifact / "model.onnx").read_bytes()
    with pytest.raises(EdgeCompressError, match=message):
        quantize_artifact(artifact, **kwargs)
    assert (artifact / "model.onnx").read_bytes() == before
