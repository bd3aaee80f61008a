"""Small graph edits the passes share: new initializers, dropping what nothing reads, dangling checks,
and the result every pass returns."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir


@dataclasses.dataclass
class StatsResult(ir.passes.PassResult):
    """A pass's result with its statistics: what it changed, and what did not fire and why."""

    stats: Any = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready, for the build report."""
        return {"modified": self.modified, **dataclasses.asdict(self.stats)}


def unique_initializer_name(graph: ir.Graph, base: str) -> str:
    name, suffix = base, 1
    while name in graph.initializers:
        name, suffix = f"{base}_{suffix}", suffix + 1
    return name


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    name = unique_initializer_name(graph, name)
    tensor = ir.tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Remove an old weight (and a Transpose feeding it) unless something else shares it."""
    if value.uses() or value.is_graph_output():
        return
    producer = value.producer()
    if producer is not None:
        source = producer.inputs[0]
        graph.remove(producer, safe=True)
        if source is not None:
            drop_if_unused(graph, source)
    elif value.is_initializer():
        graph.initializers.pop(value.name)


def graph_input(graph: ir.Graph, name: str) -> ir.Value | None:
    return next((value for value in graph.inputs if value.name == name), None)


def constant_ints(value: ir.Value | None) -> list[int] | None:
    """A constant int tensor's values (an initializer or a Constant node's), flattened; None when not constant."""
    if value is None:
        return None
    tensor = value.const_value
    producer = value.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant" and not producer.domain:
        attribute = producer.attributes.get("value")
        tensor = attribute.as_tensor() if attribute is not None else None
    return None if tensor is None else [int(v) for v in np.asarray(tensor.numpy()).reshape(-1)]


def shape_range(node: ir.Node) -> tuple[int, int | None]:
    """A Shape node's (start, end) attributes; end None when absent (to the last dim)."""
    end = node.attributes.get_int("end") if "end" in node.attributes else None
    return node.attributes.get_int("start", 0), end


def check_no_dangling_values(graph: ir.Graph) -> None:
    """Every node input and graph output is produced in the graph, an input or an initializer."""

    def is_available(value: ir.Value) -> bool:
        producer = value.producer()
        if producer is not None:
            return producer.graph is graph
        return value.is_graph_input() or value.is_initializer()

    for node in graph:
        for value in node.inputs:
            if value is not None and not is_available(value):
                raise ir.passes.PostconditionError(f"node {node.name!r} reads dangling value {value.name!r}")
    for value in graph.outputs:
        if not is_available(value):
            raise ir.passes.PostconditionError(f"graph output {value.name!r} is dangling")


# Ordering between passes, checked in requires() rather than stated in docstrings: onnxruntime fusion
# rewrites MatMul(x, Transpose(W)) into FusedMatMul and attention into contrib ops, which the weight
# passes and the layer map do not read, so every weight pass runs before it and GroupQueryAttention
# after it. FuseOrtOpsPass leaves this mark in the model's metadata.
FUSED_MARK = "edgecompress.fused_ort_ops"


def is_fused(model: ir.Model) -> bool:
    return model.metadata_props.get(FUSED_MARK) == "1"


def require_unfused(model: ir.Model, pass_name: str) -> None:
    if is_fused(model):
        raise ir.passes.PreconditionError(f"{pass_name} must run before FuseOrtOpsPass: the model is already fused")


def require_fused(model: ir.Model, pass_name: str) -> None:
    if not is_fused(model):
        raise ir.passes.PreconditionError(f"{pass_name} must run after FuseOrtOpsPass: the model is not fused yet")
