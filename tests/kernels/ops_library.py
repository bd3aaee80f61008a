"""Shared by the custom-op library tests: the library built once per session, one-node models, runs."""

from __future__ import annotations

import functools

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from edgecompress.kernels import build_library, reference

ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float64): TensorProto.DOUBLE,
}


@functools.lru_cache(maxsize=None)
def built_library():
    """kernels/build/libedgecompress_ops.so, compiled on first use (reused when already up to date)."""
    return build_library()


def one_op_model(op: str, dtypes: list, node_inputs: list[str] | None = None) -> bytes:
    """A model with one `op` node; inputs i0, i1, ... of the given numpy dtypes (shapes left dynamic)."""
    names = [f"i{j}" for j in range(len(dtypes))]
    inputs = [helper.make_tensor_value_info(n, ONNX_TYPES[np.dtype(t)], None) for n, t in zip(names, dtypes)]
    node = helper.make_node(op, node_inputs if node_inputs is not None else names, ["y"], domain=reference.DOMAIN)
    output = helper.make_tensor_value_info("y", ONNX_TYPES[np.dtype(dtypes[0])], None)
    graph = helper.make_graph([node], op, inputs, [output])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(reference.DOMAIN, reference.DOMAIN_VERSION)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9).SerializeToString()


def session(model: bytes, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    options = options or ort.SessionOptions()
    options.log_severity_level = 4  # the tests read the errors; onnxruntime's own log of them is noise
    options.register_custom_ops_library(str(built_library()))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run(op: str, *arrays, node_inputs: list[str] | None = None) -> np.ndarray:
    model = one_op_model(op, [a.dtype for a in arrays], node_inputs)
    return session(model).run(None, {f"i{j}": a for j, a in enumerate(arrays)})[0]
