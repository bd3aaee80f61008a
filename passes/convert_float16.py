"""Convert an fp32 graph to fp16 (or bf16) storage with onnxruntime's transformers converter.

`onnxruntime.transformers.float16.convert_float_to_float16` retypes every float tensor, weight and
`Cast(to=FLOAT)` of the nodes it does not block, and puts Casts around the blocked ones. It works on
a ModelProto, so the pass serializes the onnx-ir model (weights in memory: the 2 GB protobuf limit
applies, and a bigger model is refused in one line), converts, and puts the converted graph back
into the same `ir.Model`, so the pipeline's in-place stage sees it.

What stays fp32:
- graph inputs/outputs named in `keep_io` (the logits: the sampler wants fp32);
- ops in the converter's default block list ∪ {Range, CumSum, TopK, Min, Max} ∪ `op_block_list`;
- nodes in `node_block_list`: the caller's (the activation scan's hits, the lm_head on escalation)
  plus `fp32_required_nodes`: the rotary cos/sin computation where the graph still has one (fp16 holds
  integers exactly only up to 2048, so position·inv_freq loses the phase at long contexts; rotary inside
  GroupQueryAttention reads cos/sin caches computed in fp32 at build time, stored in the half type like
  any weight), and any norm, Softmax or Q·Kᵀ MatMul
  fusion left unfused (x² and the scores overflow fp16 where a fused kernel accumulates in fp32).

Contrib-op outputs (GroupQueryAttention, SkipSimplifiedLayerNormalization) carry no type after the
fusion passes and onnx's shape inference does not know them, so the pass types each used output like
the op's first float input before converting (`fill_missing_float_types`): the converter only
retypes values it knows are float. The converter would also store a tensor between two blocked
nodes as fp16; the pass hides such tensors from it, so a blocked region stays fp32 throughout.

`half="bfloat16"` runs the same conversion and block lists, then retypes fp16 as bf16, taking the
weights from their fp32 values (not through fp16). Ordering: after the fusions (fuse first, so the
exporter's fp32 upcasts are inside fused kernels rather than fp16 squares); nothing runs after it.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir

from edgecompress.passes.graph_edits import StatsResult, check_no_dangling_values
from edgecompress.passes.layer_map import PassInputError

FP16_MAX = 65504.0
# On top of the converter's default list (D.5 of docs/profiler-and-targets.md): index and
# comparison ops whose fp16 versions lose exact integers or have no kernel.
EXTRA_OP_BLOCK_LIST = ("Range", "CumSum", "TopK", "Min", "Max")
HALF_TYPES = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}
PROTO_LIMIT_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB, less room for the graph itself
# Ops that only move or reshape data: walking through them keeps the same tensor's values.
_DATA_MOVEMENT = {"Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Transpose"}
_SAME_TYPE = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Expand", "Slice", "Concat", "Neg"}
_SCORE_CHAIN = {"Add", "Mul", "Div", "Where", "Sub"} | _DATA_MOVEMENT
_VARIANCE_CHAIN = {"Add", "Sqrt", "Reciprocal"}


@dataclasses.dataclass
class ConvertFloat16Stats:
    half: str = "float16"
    nodes_converted: int = 0  # the model's nodes that now compute in half precision
    nodes_blocked: int = 0  # nodes left fp32 (op or node block list) that touch float tensors
    blocked_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    initializers_converted: int = 0
    initializers_kept_fp32: int = 0  # used only by blocked nodes
    initializers_clamped: int = 0  # held values beyond the half range, clamped by the converter
    casts_inserted: int = 0  # by the converter, at graph I/O and around blocked nodes
    round_trips_removed: int = 0  # fp32→fp16→fp32 Cast pairs of the converter on a blocked node's kept output
    io_kept_fp32: list[str] = dataclasses.field(default_factory=list)
    io_converted: int = 0


def default_op_block_list(extra: tuple[str, ...] = ()) -> list[str]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return sorted(set(DEFAULT_OP_BLOCK_LIST) | set(EXTRA_OP_BLOCK_LIST) | set(extra))


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def _is_activation(value: ir.Value | None) -> bool:
    """Computed at run time: not an initializer or a Constant."""
    if value is None or value.is_initializer() or value.const_value is not None:
        return False
    producer = value.producer()
    return producer is None or producer.op_type != "Constant"


def lm_head_nodes(graph: ir.Graph) -> list[ir.Node]:
    """The MatMul (any flavour) producing the logits, the last MatMul of a decoder, and the data
    movement between it and the output; a factored tied head's nodes (FactorEmbeddingPass); empty
    when the logits come from something else."""
    from edgecompress.passes.factor_embedding import factored_head_nodes

    value = next((v for v in graph.outputs if v.name == "logits"), None)
    chain: list[ir.Node] = []
    while value is not None and value.producer() is not None:
        node = value.producer()
        if node.op_type == "ScatterElements":
            return chain + factored_head_nodes(graph, node)
        chain.append(node)
        if node.op_type in ("MatMul", "FusedMatMul", "MatMulNBits", "Gemm"):
            return chain
        if node.op_type not in _DATA_MOVEMENT:
            break
        value = node.inputs[0]
    return []


def fp32_required_nodes(graph: ir.Graph) -> dict[str, str]:
    """Node name -> why it must stay fp32 whatever the activations: rotary cos/sin, unfused
    norms, Softmax and the Q·Kᵀ MatMul feeding it."""
    required: dict[str, str] = {}

    def mark(node: ir.Node, reason: str) -> None:
        required.setdefault(node.name, reason)

    for node in graph:
        if node.op_type in ("Cos", "Sin") and _is_float(node.outputs[0]):
            # Back to the Cast that turns integer positions into floats.
            stack = [node]
            while stack:
                current = stack.pop()
                if current.name in required:
                    continue
                mark(current, "rotary cos/sin (positions in fp32)")
                for value in current.inputs:
                    producer = value.producer() if value is not None else None
                    if producer is not None and _is_float(value) and _is_activation(value):
                        stack.append(producer)
        elif node.op_type == "ReduceMean" and node.inputs and _squared(node.inputs[0]) is not None:
            square = node.inputs[0].producer()
            mark(square, "unfused norm: x² overflows fp16 above |x| = 256")
            mark(node, "unfused norm: mean of x²")
            current = node
            while True:  # + eps, sqrt, reciprocal: the variance side up to the multiply by x
                consumers = [use.node for use in current.outputs[0].uses()]
                if len(consumers) != 1 or not _on_variance_side(consumers[0], current.outputs[0]):
                    break
                current = consumers[0]
                mark(current, "unfused norm: variance")
        elif node.op_type == "Softmax":
            mark(node, "unfused Softmax")
            stack = [node.inputs[0]]
            while stack:  # scale, mask and Q·Kᵀ behind the scores
                value = stack.pop()
                producer = value.producer() if value is not None else None
                if producer is None or producer.name in required or not _is_activation(value):
                    continue
                if producer.op_type == "MatMul":
                    if all(_is_activation(v) for v in producer.inputs):
                        mark(producer, "unfused attention: Q·Kᵀ scores")
                elif producer.op_type in _SCORE_CHAIN:
                    mark(producer, "unfused attention: scores")
                    stack.extend(producer.inputs)
    return required


def _on_variance_side(node: ir.Node, variance: ir.Value) -> bool:
    """+ eps, sqrt, 1/x (also as Div(1, x)): not the Div or Mul that applies the norm to x."""
    if node.op_type == "Div":
        return node.inputs[1] is variance and not _is_activation(node.inputs[0])
    return node.op_type in _VARIANCE_CHAIN


def _squared(value: ir.Value | None) -> ir.Value | None:
    """x when `value` is Pow(x, 2) or Mul(x, x)."""
    node = value.producer() if value is not None else None
    if node is None:
        return None
    if node.op_type == "Mul" and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    if node.op_type == "Pow" and len(node.inputs) == 2:
        exponent = node.inputs[1].const_value if node.inputs[1] is not None else None
        if exponent is not None and exponent.numpy().size == 1 and float(exponent.numpy().reshape(())) == 2.0:
            return node.inputs[0]
    return None


def decomposed_norm_inputs(graph: ir.Graph) -> dict[str, str]:
    """ReduceMean(x²) node name -> the name of x: norms the fusions did not catch."""
    found = {}
    for node in graph:
        if node.op_type == "ReduceMean" and node.inputs:
            x = _squared(node.inputs[0])
            if x is not None:
                found[node.name] = x.name
    return found


def name_nodes(graph: ir.Graph) -> None:
    """Block lists match by name: give every node a unique one."""
    seen: set[str] = set()
    for index, node in enumerate(graph):
        if not node.name or node.name in seen:
            node.name = f"fp16_node_{index}"
        seen.add(node.name)


def fill_missing_float_types(graph: ir.Graph) -> None:
    """Type the used outputs the fusion passes left untyped: a contrib op's like its first float
    input (the norms' unused mean/inv_std outputs are fp32 whatever the input: left alone), a
    data-movement op's like its data input. The converter and the scan only see typed values."""
    for node in graph:
        if node.domain == "com.microsoft":
            source = next((v for v in node.inputs if v is not None and v.dtype is not None
                           and v.dtype.is_floating_point()), None)
        elif node.op_type in _SAME_TYPE and node.inputs and node.inputs[0] is not None:
            source = node.inputs[0]
        else:
            continue
        for output in node.outputs:
            if output.dtype is None and source is not None and source.dtype is not None and (
                    output.uses() or output.is_graph_output()):
                output.dtype = source.dtype


def _keep_blocked_regions_fp32(proto, blocked: set[str], op_block_list: set[str]) -> dict[str, int]:
    """Edit the value_info the converter reads (it retypes every float value it has one for).

    - Initializers lose theirs: the converter decides their dtype from their users, but would
      still retype an fp32-only weight's value_info to fp16.
    - A tensor made by a blocked node and read only by blocked nodes loses its: otherwise the
      converter stores it as fp16 between the two (a Cast down after the producer, one up before
      each consumer), and a run of blocked nodes would still round-trip through fp16.
    Returns the hidden tensors and their dtypes, to restore after the conversion.
    """
    graph = proto.graph
    initializers = {tensor.name for tensor in graph.initializer}
    outputs = {value.name for value in graph.output}
    is_blocked = {node.name: node.name in blocked or node.op_type in op_block_list for node in graph.node}
    producer_blocked: dict[str, bool] = {}
    consumers_blocked: dict[str, bool] = {}
    for node in graph.node:
        for name in node.output:
            producer_blocked[name] = is_blocked[node.name]
        for name in node.input:
            consumers_blocked[name] = consumers_blocked.get(name, True) and is_blocked[node.name]
    internal = {name for name, blocked_producer in producer_blocked.items()
                if blocked_producer and consumers_blocked.get(name, False) and name not in outputs}
    hidden = {info.name: info.type.tensor_type.elem_type for info in graph.value_info if info.name in internal}
    kept = [info for info in graph.value_info if info.name not in initializers and info.name not in internal]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return {name: ir.DataType(elem_type) for name, elem_type in hidden.items()}


def _drop_round_trips(graph: ir.Graph) -> int:
    """The converter puts Cast(fp16)→Cast(fp32) between a blocked node and a kept-fp32 graph output
    (a blocked lm_head and the logits): pure rounding, removed, the output keeps its name."""
    removed = 0
    for node in list(graph):
        if node.op_type != "Cast" or node.attributes.get_int("to") != ir.DataType.FLOAT:
            continue
        down = node.inputs[0].producer()
        if (down is None or down.op_type != "Cast" or down.attributes.get_int("to") != ir.DataType.FLOAT16
                or not down.name.endswith("_cast_to_fp16_node") or len(node.inputs[0].uses()) != 1
                or down.inputs[0].dtype != ir.DataType.FLOAT):
            continue
        source, result = down.inputs[0], node.outputs[0]
        if result.is_graph_output() and source.is_graph_output():
            continue
        name = result.name
        result.replace_all_uses_with(source, replace_graph_outputs=True)
        graph.remove([node, down], safe=True)
        if source.is_graph_output():
            source.name = name
        removed += 1
    return removed


def _initializer_bytes(graph: ir.Graph) -> int:
    return sum(value.const_value.nbytes for value in graph.initializers.values() if value.const_value is not None)


class ConvertFloat16Pass(ir.passes.InPlacePass):
    """fp32 → fp16 (or bf16) storage, keeping `keep_io`, blocked ops and blocked nodes fp32."""

    def __init__(self, keep_io: tuple[str, ...] = ("logits",), op_block_list: tuple[str, ...] = (),
                 node_block_list: dict[str, str] | tuple[str, ...] = (), half: str = "float16"):
        super().__init__()
        if half not in HALF_TYPES:
            raise PassInputError(f"half precision must be one of {', '.join(HALF_TYPES)}, got {half!r}")
        self.keep_io, self.half = tuple(keep_io), half
        self.op_block_list = default_op_block_list(tuple(op_block_list))
        # name -> reason; a plain list gets one reason
        self.node_block_list = (dict(node_block_list) if isinstance(node_block_list, dict)
                                else {name: "node block list" for name in node_block_list})

    def requires(self, model: ir.Model) -> None:
        graph = model.graph
        values = (*graph.initializers.values(), *graph.inputs, *(v for node in graph for v in node.outputs))
        half = [v.name for v in values if v.dtype in HALF_TYPES.values()]
        if half:
            raise PassInputError(f"{type(self).__name__} expects an fp32 model; {half[0]!r} is already half precision")
        names = {v.name for v in (*graph.inputs, *graph.outputs)}
        unknown = [name for name in self.keep_io if name not in names]
        if unknown:
            raise PassInputError(f"fp16 keep_io names {unknown[0]!r}, which is not a graph input or output")
        size = _initializer_bytes(graph)
        if size > PROTO_LIMIT_BYTES:
            raise PassInputError(
                f"fp16 conversion of a model with {size / 1024**3:.1f} GB of weights is not implemented: the "
                f"converter works on an in-memory ModelProto, limited to 2 GB"
            )

    def ensures(self, model: ir.Model) -> None:
        check_no_dangling_values(model.graph)
        half = HALF_TYPES[self.half]
        for value in (*model.graph.inputs, *model.graph.outputs):
            if value.name in self.keep_io and value.dtype != ir.DataType.FLOAT:
                raise ir.passes.PostconditionError(f"{value.name!r} should have stayed fp32")
            if value.name not in self.keep_io and value.dtype == ir.DataType.FLOAT:
                raise ir.passes.PostconditionError(f"graph I/O {value.name!r} is still fp32 (not {half.name})")

    def call(self, model: ir.Model) -> StatsResult:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        graph = model.graph
        name_nodes(graph)
        fill_missing_float_types(graph)
        blocked = dict(fp32_required_nodes(graph))
        blocked.update(self.node_block_list)
        names_in_graph = {node.name for node in graph}
        missing = sorted(set(self.node_block_list) - names_in_graph)
        if missing:
            raise PassInputError(f"fp16 node block list names {missing[0]!r}, which is not a node of the graph")
        stats = ConvertFloat16Stats(half=self.half)
        self._count_blocked(graph, blocked, stats)
        nodes_before = len(graph)
        ir.external_data.load_to_model(model)
        fp32_weights = {name: value.const_value.numpy() for name, value in graph.initializers.items()
                        if value.dtype == ir.DataType.FLOAT} if self.half == "bfloat16" else {}
        for value in graph.initializers.values():
            tensor = value.const_value
            if value.dtype == ir.DataType.FLOAT and tensor is not None and tensor.nbytes:
                stats.initializers_clamped += float(np.max(np.abs(tensor.numpy()))) > FP16_MAX
        proto = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model))
        internal = _keep_blocked_regions_fp32(proto, set(blocked), set(self.op_block_list))
        converted = convert_float_to_float16(
            proto, keep_io_types=list(self.keep_io), op_block_list=self.op_block_list,
            node_block_list=sorted(blocked), force_fp16_initializers=False, disable_shape_infer=True,
        )
        del proto
        new = ir.serde.deserialize_model(converted)
        del converted
        new.graph.sort()  # the converter appends its Casts at the end
        for node in new.graph:  # what was hidden from the converter is fp32 (onnxruntime infers the same)
            for value in node.outputs:
                if value.dtype is None and value.name in internal:
                    value.dtype = internal[value.name]
        stats.round_trips_removed = _drop_round_trips(new.graph)
        if self.half == "bfloat16":
            _retype_half(new.graph, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, fp32_weights)
        half = HALF_TYPES[self.half]
        stats.casts_inserted = len(new.graph) - nodes_before
        stats.initializers_converted = sum(v.dtype == half for v in new.graph.initializers.values())
        stats.initializers_kept_fp32 = sum(v.dtype == ir.DataType.FLOAT for v in new.graph.initializers.values())
        stats.io_kept_fp32 = [v.name for v in (*new.graph.inputs, *new.graph.outputs) if v.dtype == ir.DataType.FLOAT]
        stats.io_converted = sum(v.dtype == half for v in (*new.graph.inputs, *new.graph.outputs))
        stats.nodes_converted = sum(  # the model's own nodes, not the converter's Casts
            1 for node in new.graph
            if node.name in names_in_graph and node.name not in blocked and any(o.dtype == half for o in node.outputs)
        )
        model.graph = new.graph  # in place for the stage: the same Model object, the converted graph
        model.ir_version = max(model.ir_version, new.ir_version)
        return StatsResult(model, modified=True, stats=stats)

    def _count_blocked(self, graph: ir.Graph, blocked: dict[str, str], stats: ConvertFloat16Stats) -> None:
        reasons: collections.Counter = collections.Counter()
        for node in graph:
            touches_float = any(_is_float(v) for v in (*node.inputs, *node.outputs))
            if not touches_float:
                continue
            if node.name in blocked:
                reasons[blocked[node.name]] += 1
            elif node.op_type in self.op_block_list:
                reasons[f"op block list: {node.op_type}"] += 1
        stats.nodes_blocked = sum(reasons.values())
        stats.blocked_by_reason = dict(reasons)


def _retype_half(graph: ir.Graph, old: ir.DataType, new: ir.DataType, fp32_weights: dict[str, np.ndarray]) -> None:
    """Every `old` tensor, weight and Cast target becomes `new`; weights from their fp32 values."""
    for name, value in list(graph.initializers.items()):
        if value.dtype == old:
            source = fp32_weights.get(name, value.const_value.numpy().astype(np.float32))
            value.const_value = ir.tensor(source.astype(new.numpy()), name=name)
            value.dtype = new
    for value in graph.inputs:
        if value.dtype == old:
            value.dtype = new
    for node in graph:
        cast_to = node.attributes.get("to")
        if node.op_type == "Cast" and cast_to is not None and cast_to.as_int() == old:
            node.attributes["to"] = ir.AttrInt64("to", new)
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and attr.as_tensor().dtype == old:
                array = attr.as_tensor().numpy().astype(np.float32).astype(new.numpy())
                node.attributes[attr.name] = ir.AttrTensor(attr.name, ir.tensor(array))
        for output in node.outputs:
            if output.dtype == old:
                output.dtype = new
