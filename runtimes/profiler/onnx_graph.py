"""Just enough of model.onnx for the profiler: nodes, the initializers they read, and their sizes.

The runtime may not import the `onnx` package (it is not on the device, and a test keeps it out), so
this reads the protobuf wire format directly. Only the fields the roofline and the role table need
are decoded; everything else (doc strings, shapes, subgraphs) is skipped without being parsed. The
weights stay in model.onnx.data: an initializer's size comes from its external-data `length`, its
raw bytes or its dims, never from reading the data.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

from edgecompress.runtimes.errors import ArtifactRuntimeError

# onnx.TensorProto.DataType -> bytes per element (4-bit types: half a byte)
ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16,
                 16: 2, 17: 1, 18: 1, 19: 1, 20: 1, 21: 0.5, 22: 0.5, 23: 0.5}
# onnx.TensorProto.DataType -> numpy's dtype name (what `inspect` prints)
ELEMENT_NAMES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
                 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}
# Field numbers from onnx.proto3.
MODEL_PRODUCER, MODEL_PRODUCER_VERSION, MODEL_GRAPH, MODEL_OPSET = 2, 3, 7, 8
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT = 1, 5, 11, 12
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP, NODE_ATTRIBUTE, NODE_DOMAIN, NODE_METADATA = 1, 2, 3, 4, 5, 7, 9
ATTR_NAME, ATTR_INT = 1, 3
TENSOR_DIMS, TENSOR_TYPE, TENSOR_NAME, TENSOR_RAW, TENSOR_EXTERNAL = 1, 2, 8, 9, 13
TENSOR_TYPED_FIELDS = {4, 5, 7, 10, 11}  # float_data, int32_data, int64_data, double_data, uint64_data
SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # the exporter's module path of every node
LOW_RANK_KEY = "edgecompress.low_rank_factor"  # set by passes/split_low_rank.py on both factor MatMuls


@dataclass
class Initializer:
    name: str
    dims: tuple[int, ...]
    data_type: int
    nbytes: int


@dataclass
class Node:
    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    ints: dict[str, int] = field(default_factory=dict)  # integer attributes (MatMulNBits K, N, bits, ...)
    scope: str = ""  # the deepest module path the exporter recorded ("model.model.layers.3.mlp.up_proj")
    low_rank: str = ""  # "A" / "B" for SplitLowRankPass factors


@dataclass
class Graph:
    nodes: list[Node]
    initializers: dict[str, Initializer]
    opsets: dict[str, int]
    inputs: dict[str, tuple[int, list]] = field(default_factory=dict)  # name -> (elem type, dims: int or str)
    outputs: dict[str, tuple[int, list]] = field(default_factory=dict)
    producer: str = ""  # "name version" of the tool that wrote the file

    def weights_of(self, node: Node) -> list[Initializer]:
        return [self.initializers[name] for name in node.inputs if name in self.initializers]


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def fields(buf: memoryview):
    """(field number, wire type, value) of one message; length-delimited values as memoryview slices."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _text(value: memoryview) -> str:
    return bytes(value).decode("utf-8")


def _packed_ints(wire: int, value) -> list[int]:
    if wire == 0:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        item, pos = _varint(value, pos)
        out.append(item)
    return out


def _entry(buf: memoryview) -> tuple[str, str]:
    key = val = ""
    for number, _, value in fields(buf):
        if number == 1:
            key = _text(value)
        elif number == 2:
            val = _text(value)
    return key, val


def _numel(dims) -> int:
    total = 1
    for dim in dims:
        total *= dim
    return total


def _initializer(buf: memoryview) -> Initializer:
    name, dims, data_type, raw, typed, external = "", [], 0, None, 0, {}
    for number, wire, value in fields(buf):
        if number == TENSOR_DIMS:
            dims += _packed_ints(wire, value)
        elif number == TENSOR_TYPE:
            data_type = value
        elif number == TENSOR_NAME:
            name = _text(value)
        elif number == TENSOR_RAW:
            raw = len(value)
        elif number == TENSOR_EXTERNAL:
            key, val = _entry(value)
            external[key] = val
        elif number in TENSOR_TYPED_FIELDS:
            typed += 1
    if "length" in external:
        nbytes = int(external["length"])
    elif raw is not None:
        nbytes = raw
    else:  # typed fields or external data without a length: the dims say it
        nbytes = int(_numel(dims) * ELEMENT_BYTES.get(data_type, 4) + 0.5)
    return Initializer(name, tuple(dims), data_type, nbytes)


def _attribute_int(buf: memoryview) -> tuple[str, int | None]:
    name, number_value = "", None
    for number, _, value in fields(buf):
        if number == ATTR_NAME:
            name = _text(value)
        elif number == ATTR_INT:
            number_value = value - (1 << 64) if value >= 1 << 63 else value
    return name, number_value


def deepest_scope(text: str) -> str:
    """The last dotted module path in the exporter's name_scopes list ("['', 'model', 'model.lm_head', ...]")."""
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return ""
    dotted = [s for s in scopes if isinstance(s, str) and "." in s]
    return dotted[-1] if dotted else ""


def _node(buf: memoryview) -> Node:
    node = Node("", "", "", [], [])
    for number, _, value in fields(buf):
        if number == NODE_INPUT:
            node.inputs.append(_text(value))
        elif number == NODE_OUTPUT:
            node.outputs.append(_text(value))
        elif number == NODE_NAME:
            node.name = _text(value)
        elif number == NODE_OP:
            node.op_type = _text(value)
        elif number == NODE_DOMAIN:
            node.domain = _text(value)
        elif number == NODE_ATTRIBUTE:
            name, number_value = _attribute_int(value)
            if number_value is not None:
                node.ints[name] = number_value
        elif number == NODE_METADATA:
            key, val = _entry(value)
            if key == SCOPES_KEY:
                node.scope = deepest_scope(val)
            elif key == LOW_RANK_KEY:
                node.low_rank = val
    return node


def _value_info(buf: memoryview) -> tuple[str, int, list]:
    """ValueInfoProto -> (name, elem type, dims); TypeProto.tensor_type.shape.dim[] of value or param."""
    name, elem, dims = "", 0, []
    for number, _, value in fields(buf):
        if number == 1:
            name = _text(value)
        elif number == 2:
            for kind, _, tensor in fields(value):
                if kind != 1:  # tensor_type
                    continue
                for sub, _, sub_value in fields(tensor):
                    if sub == 1:
                        elem = sub_value
                    elif sub == 2:
                        dims = [_dimension(dim) for n, _, dim in fields(sub_value) if n == 1]
    return name, elem, dims


def _dimension(buf: memoryview):
    for number, _, value in fields(buf):
        if number == 1:
            return value
        if number == 2:
            return _text(value)
    return None


def read_graph(path: str | Path) -> Graph:
    """The top-level graph of `path` (no subgraphs: decoder exports have no control flow)."""
    try:
        buf = memoryview(Path(path).read_bytes())
        graph_buf, opsets, producer = None, {}, ["", ""]
        for number, _, value in fields(buf):
            if number == MODEL_GRAPH:
                graph_buf = value
            elif number == MODEL_OPSET:
                domain, version = "", 0
                for sub, _, sub_value in fields(value):
                    if sub == 1:
                        domain = _text(sub_value)
                    elif sub == 2:
                        version = sub_value
                opsets[domain or "ai.onnx"] = version
            elif number in (MODEL_PRODUCER, MODEL_PRODUCER_VERSION):
                producer[number - MODEL_PRODUCER] = _text(value)
        if graph_buf is None:
            raise ValueError("no graph")
        graph = Graph([], {}, opsets, producer=" ".join(producer).strip())
        for number, _, value in fields(graph_buf):
            if number == GRAPH_NODE:
                graph.nodes.append(_node(value))
            elif number == GRAPH_INITIALIZER:
                init = _initializer(value)
                graph.initializers[init.name] = init
            elif number in (GRAPH_INPUT, GRAPH_OUTPUT):
                name, elem, dims = _value_info(value)
                (graph.inputs if number == GRAPH_INPUT else graph.outputs)[name] = (elem, dims)
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise ArtifactRuntimeError(f"'{path}' is not a readable ONNX model: {exc}") from None
    return graph
