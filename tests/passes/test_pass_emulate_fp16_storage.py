"""EmulateFp16StoragePass: the fp32 twin shows the fp16 overflow that onnxruntime's CPU provider hides.

The chain of D.4 (docs/profiler-and-targets.md): y = x·W, y², ×1e-6. On a GPU every op stores fp16, so
y² > 65504 is inf before the scale brings it back; the CPU provider runs MatMul, Mul, Mul as one
fp32 island and never shows it. The twin must."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from edgecompress.passes import ConvertFloat16Pass, EmulateFp16StoragePass, PassInputError


def _chain_model() -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4, 8]))
    weight = ir.tensor(np.full((8, 16), 50.0, np.float32), name="w")
    w = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=weight.shape, const_value=weight)
    scale_t = ir.tensor(np.array(1e-6, np.float32), name="scale")
    scale = ir.Value(name="scale", type=ir.TensorType(ir.DataType.FLOAT), shape=scale_t.shape, const_value=scale_t)
    matmul = ir.node("MatMul", [x, w], name="matmul")
    square = ir.node("Mul", [matmul.outputs[0], matmul.outputs[0]], name="square")
    scaled = ir.node("Mul", [square.outputs[0], scale], name="scaled")
    for node, name in ((matmul, "y"), (square, "y2"), (scaled, "out")):
        node.outputs[0].name, node.outputs[0].dtype = name, ir.DataType.FLOAT
    graph = ir.Graph([x], [scaled.outputs[0]], nodes=[matmul, square, scaled], initializers=[w, scale],
                     opset_imports={"": 18}, name="chain")
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


X = np.ones((4, 8), np.float32)  # y = 400 everywhere: y² = 160000 > 65504, out = 0.16


def test_twin_shows_the_overflow_the_cpu_provider_hides():
    model = _chain_model()
    assert np.isfinite(_run(model, X)).all()
    result = ConvertFloat16Pass(keep_io=("x", "out"))(model)
    assert result.stats.nodes_converted == 3 and result.stats.initializers_converted == 2
    plain = _run(model, X)
    assert plain.dtype == np.float32 and np.isfinite(plain).all()  # the CPU's fp32 island: no inf
    np.testing.assert_allclose(plain, 160000 * float(np.float16(1e-6)), rtol=1e-3)  # the scale is fp16 now

    twin = EmulateFp16StoragePass()(model)
    assert twin.stats.tensors_rounded == 3 + 1  # y, y², out and the Cast to fp16 of the input x
    emulated = _run(model, X)
    assert np.isinf(emulated).all()  # y² stored in fp16: inf, as a GPU would give


def test_twin_rounds_like_fp16_below_the_overflow():
    model = _chain_model()
    ConvertFloat16Pass(keep_io=("x", "out"))(model)
    EmulateFp16StoragePass()(model)
    x = np.full((4, 8), 0.3, np.float32)  # y = 120, y² = 14400: finite in fp16
    y = np.float16(np.float16(0.3) * np.float32(8 * 50.0))
    expected = np.float16(np.float16(np.float32(y) * np.float32(y)) * np.float16(1e-6))
    np.testing.assert_array_equal(_run(model, x), np.full((4, 16), np.float32(expected)))


def test_blocked_nodes_stay_fp32_in_the_twin():
    model = _chain_model()
    # Blocking the square alone is not enough: its fp16 consumer would read y² through a Cast to fp16.
    ConvertFloat16Pass(keep_io=("x", "out"), node_block_list=("square", "scaled"))(model)
    EmulateFp16StoragePass()(model)
    out = _run(model, X)  # y² and its scaling are fp32 in the artifact: the twin must not round them
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, 0.16, rtol=1e-3)


def test_an_fp32_model_is_refused():
    with pytest.raises(PassInputError, match="needs a half-precision model"):
        EmulateFp16StoragePass()(_chain_model())
