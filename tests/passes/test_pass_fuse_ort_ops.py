"""FuseOrtOpsPass on a tiny exported Llama: fused op counts, reported misses, parity with onnxruntime."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from edgecompress.passes.fuse_ort_ops import EXPECTED, FuseOrtOpsPass, missing_fusions, op_type_counts
from edgecompress.passes.quantize_weights import QuantizeWeightsPass

LAYERS = 3


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter((node.domain, node.op_type) for node in model.graph)


def test_fuses_norms_and_reports_the_rest(exported_llama, decoder_parity):
    model = ir.load(exported_llama[1])
    feeds = decoder_parity.feeds(num_layers=LAYERS)
    unfused = decoder_parity.onnx(model, feeds)
    fuse = FuseOrtOpsPass()
    before = op_type_counts(model.graph)

    fuse_result = fuse(model)
    assert fuse_result.modified
    fused = decoder_parity.onnx(model, feeds)

    ops = _ops(model)
    # Two RMSNorms per layer take the residual Add with them; the first input norm stays plain.
    assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 2 * LAYERS
    assert fuse_result.stats.fused_ops["SkipSimplifiedLayerNormalization"] == 2 * LAYERS
    assert fuse_result.stats.nan_guards_removed == LAYERS and ops[("", "IsNaN")] == 0
    assert fuse_result.stats.nodes_after < fuse_result.stats.nodes_before
    # The export shares one past Dim across the caches, so attention fuses (onnxscript picks MHA).
    assert ops[("com.microsoft", "MultiHeadAttention")] == LAYERS
    assert fuse_result.stats.fused_ops["MultiHeadAttention"] == LAYERS
    # Measured with onnxscript 0.7.2 on the torch 2.13 export: these do not fire, each with a reason.
    missing = missing_fusions(before, op_type_counts(model.graph))  # what a fusion stage reports
    assert set(missing) == {"RotaryEmbedding", "MatMul+Add", "SiLU-mul"}
    assert all(missing[name] == EXPECTED[name][1] for name in missing)
    decoder_parity.assert_close(fused, unfused, atol=1e-4)


def test_fusion_after_int4_keeps_the_quantized_matmuls(exported_llama, decoder_parity):
    model = ir.load(exported_llama[1])
    QuantizeWeightsPass(bits=4, block_size=32, accuracy_level=4)(model)
    feeds = decoder_parity.feeds(num_layers=LAYERS)
    unfused = decoder_parity.onnx(model, feeds)
    nbits = _ops(model)[("com.microsoft", "MatMulNBits")]

    FuseOrtOpsPass()(model)

    assert _ops(model)[("com.microsoft", "MatMulNBits")] == nbits == 7 * LAYERS + 1
    fused = decoder_parity.onnx(model, feeds)
    np.testing.assert_allclose(fused["logits"], unfused["logits"], atol=1e-4, rtol=0)


def test_new_passes_and_their_rewriter_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import edgecompress.passes.quantize_weights, edgecompress.passes.map_gguf_weights\n"
        "from edgecompress.passes.fuse_ort_ops import _nan_guard_rule\n"
        "import onnxscript.rewriter.ort_fusions\n"
        "_nan_guard_rule()\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-P", "-c", code], check=True)
