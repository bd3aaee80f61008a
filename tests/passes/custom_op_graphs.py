"""One-node graphs of the ai.edgecompress ops with random weights, and a runner for them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecompress.kernels.reference import DOMAIN


def random_factors(op: str, rng, dtype, k_blocks=(2, 3), extra=(3, 5, 2)) -> tuple[list[np.ndarray], int, int]:
    """(factors in input order, K, N) for random shapes of `op`."""
    blocks = int(rng.choice(k_blocks))
    p, q, rank = extra

    def array(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1)).astype(dtype)

    if op == "LowRankMatMul":
        k, n = blocks * p, blocks * q
        return [array(k, rank), array(rank, n)], k, n
    if op == "MonarchMatMul":
        channels = blocks * rank
        return [array(blocks, p, channels), array(blocks, channels, q)], blocks * p, blocks * q
    return [array(blocks, rank, q), array(blocks, blocks, rank), array(blocks, p, rank)], blocks * p, blocks * q


def one_op_model(op: str, factors, x_shape, bias=None, opset: int = 18, dtype=np.float32) -> ir.Model:
    """Y = op(X, *factors[, bias]) with the factors as initializers; X and Y keep symbolic dims."""
    elem = ir.DataType.from_numpy(np.dtype(dtype))
    x = ir.Value(name="X", type=ir.TensorType(elem), shape=ir.Shape(x_shape))
    weights = []
    for index, array in enumerate([*factors, *([] if bias is None else [bias])]):
        tensor = ir.tensor(array, name=f"w{index}")
        weights.append(ir.Value(name=f"w{index}", shape=tensor.shape, type=ir.TensorType(elem), const_value=tensor))
    node = ir.node(op, [x, *weights], domain=DOMAIN, name="custom", metadata_props={"origin": "test"})
    y = node.outputs[0]
    y.name, y.type = "Y", ir.TensorType(elem)
    graph = ir.Graph([x], [y], nodes=[node], initializers=weights, opset_imports={"": opset, DOMAIN: 1})
    return ir.Model(graph, ir_version=10)


def run(model: ir.Model, feeds: dict, register=None) -> list[np.ndarray]:
    """Run with onnxruntime CPU; `register(session_options)` adds our library when given."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if register is not None:
        register(options)
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
