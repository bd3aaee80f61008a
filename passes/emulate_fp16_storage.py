"""Turn a half-precision artifact into its fp32 twin that rounds like a GPU stores.

onnxruntime's CPU provider has no fp16 kernel for most ops (MatMul, Add, Mul, Softmax, ...): it
wraps them in Cast→fp32→Cast and merges neighbouring wrapped nodes into one fp32 island, so an
intermediate that would overflow fp16 storage on a GPU never exists on the CPU (D.4 of
docs/profiler-and-targets.md). The twin computes every op in fp32 but rounds each tensor that is
half precision in the artifact through Cast(to=half)→Cast(to=fp32) right after it is produced:
every op stores half precision, as on a GPU, while inside one op (a GEMM, a fused norm or attention
kernel) it accumulates in fp32. Overflow shows as inf, as it would on the device; fp16 accumulation
inside a GPU kernel is not modelled. onnxruntime keeps these Cast pairs (cast-chain elimination is
opt-in), so the twin runs with the default optimizations.

Applied to a copy of the artifact (loaded from disk): blocked fp32 nodes are left alone, because
their tensors are fp32 in the artifact. Half weights become fp32 holding the same (rounded) values;
`Cast(to=half)` becomes `Cast(to=FLOAT)` followed by the rounding pair. The twin's I/O is fp32
everywhere (fed like the fp32 export); half inputs are rounded on entry.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgecompress.passes.graph_edits import StatsResult, check_no_dangling_values
from edgecompress.passes.layer_map import PassInputError

HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
ROUND_MARK = "edgecompress.storage_round"  # metadata on the Casts this pass adds


@dataclasses.dataclass
class EmulateFp16StorageStats:
    half: str = ""
    tensors_rounded: int = 0  # node outputs and graph inputs given a rounding pair
    initializers_widened: int = 0
    casts_retargeted: int = 0  # Cast(to=half) now Cast(to=FLOAT)
    nodes_before: int = 0
    nodes_after: int = 0


def _half_type(graph: ir.Graph) -> ir.DataType | None:
    for value in (*graph.inputs, *graph.initializers.values()):
        if value.dtype in HALF:
            return value.dtype
    for node in graph:
        for value in node.outputs:
            if value.dtype in HALF:
                return value.dtype
    return None


class EmulateFp16StoragePass(ir.passes.InPlacePass):
    """fp16/bf16 artifact → fp32 graph with a half-precision rounding after every half tensor."""

    def requires(self, model: ir.Model) -> None:
        if _half_type(model.graph) is None:
            raise PassInputError(
                "EmulateFp16StoragePass needs a half-precision model; this one has no fp16/bf16 tensor")

    def ensures(self, model: ir.Model) -> None:
        check_no_dangling_values(model.graph)
        for node in model.graph:
            for value in node.outputs:
                if value.dtype in HALF and node.metadata_props.get(ROUND_MARK) != "1":
                    raise ir.passes.PostconditionError(
                        f"{value.name!r} is still {value.dtype.name} outside a rounding pair")

    def call(self, model: ir.Model) -> StatsResult:
        graph = model.graph
        half = _half_type(graph)
        stats = EmulateFp16StorageStats(half=half.name, nodes_before=len(graph))
        for name, value in graph.initializers.items():
            if value.dtype == half:
                value.const_value = ir.tensor(value.const_value.numpy().astype(np.float32), name=name)
                value.dtype = ir.DataType.FLOAT
                stats.initializers_widened += 1
        first = next(iter(graph), None)
        for value in graph.inputs:
            if value.dtype == half:
                value.dtype = ir.DataType.FLOAT
                self._round_after(graph, value, half, before=first)
                stats.tensors_rounded += 1
        for node in list(graph):
            if node.op_type == "Cast" and node.attributes.get_int("to") == half:
                node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT)
                stats.casts_retargeted += 1
            for attr in list(node.attributes.values()):
                if attr.type == ir.AttributeType.TENSOR and attr.as_tensor().dtype == half:
                    widened = ir.tensor(attr.as_tensor().numpy().astype(np.float32))
                    node.attributes[attr.name] = ir.AttrTensor(attr.name, widened)
            for value in node.outputs:
                if value.dtype == half:
                    value.dtype = ir.DataType.FLOAT
                    self._round_after(graph, value, half, after=node)
                    stats.tensors_rounded += 1
        stats.nodes_after = len(graph)
        return StatsResult(model, modified=True, stats=stats)

    @staticmethod
    def _round_after(graph: ir.Graph, value: ir.Value, half: ir.DataType, after: ir.Node | None = None,
                     before: ir.Node | None = None) -> None:
        uses = list(value.uses())
        base = value.name or "value"
        down = ir.node("Cast", [value], {"to": half}, name=f"{base}_store_{half.name.lower()}",
                       metadata_props={ROUND_MARK: "1"})
        up = ir.node("Cast", [down.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{base}_load_fp32",
                     metadata_props={ROUND_MARK: "1"})
        down.outputs[0].name, down.outputs[0].dtype = f"{base}_{half.name.lower()}", half
        rounded = up.outputs[0]
        rounded.dtype, rounded.shape = ir.DataType.FLOAT, value.shape
        if after is not None:
            graph.insert_after(after, [down, up])
        elif before is not None:
            graph.insert_before(before, [down, up])
        else:
            graph.extend([down, up])
        for use in uses:
            use.node.replace_input_with(use.idx, rounded)
        if value.is_graph_output():  # the twin's output is the rounded tensor, under the same name
            index = list(graph.outputs).index(value)
            name = value.name
            value.name = f"{name}_unrounded"
            rounded.name = name
            graph.outputs[index] = rounded
        else:
            rounded.name = f"{base}_rounded"
