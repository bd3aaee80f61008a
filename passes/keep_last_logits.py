"""Compute logits only for the positions a caller keeps: the optional input `logits_to_keep`.

`logits_to_keep` (int64 scalar, Hugging Face's argument of the same name) is a graph input with an
initializer of the same name, so a caller that does not know it (onnxruntime-genai, perplexity,
verification) gets the default 0 = every position, and the artifact behaves exactly as before; a caller
that feeds 1 (prefill in `generate` and `profile`) gets logits [batch, 1, vocab] and the LM head
(576 x 49,152 on smollm2: the largest MatMul of a prefill) runs on one row per sequence instead of all.
The final hidden states are sliced before the head: h[:, -k:] for k > 0, h for k = 0.

Ordering, checked in `requires`: on the float export (the lm_head is a plain Linear the layer map finds),
before FactorEmbeddingPass and the weight and fusion passes, which then take the sliced head as it is.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgecompress.contract import LOGITS, LOGITS_SEQUENCE, LOGITS_TO_KEEP
from edgecompress.passes.graph_edits import StatsResult, add_initializer, require_unfused
from edgecompress.passes.layer_map import PassInputError, build_layer_map

HEAD = "lm_head"


@dataclasses.dataclass
class KeepLastLogitsStats:
    input_added: str = ""  # the new input's name
    head_node: str = ""  # the MatMul whose input is now sliced


class KeepLastLogitsPass(ir.passes.InPlacePass):
    """Add `logits_to_keep` (default 0: all positions) and slice the LM head's input by it."""

    def requires(self, model: ir.Model) -> None:
        require_unfused(model, type(self).__name__)
        graph = model.graph
        if any(value.name == LOGITS_TO_KEEP for value in graph.inputs):
            raise PassInputError(f"the model already has a {LOGITS_TO_KEEP!r} input")
        if not any(value.name == LOGITS for value in graph.outputs):
            raise PassInputError(f"the model has no {LOGITS!r} output")
        site = build_layer_map(graph).linears.get(HEAD)
        if site is None:
            raise PassInputError(f"no {HEAD!r} Linear found in the graph (run on the float export, before "
                                 "FactorEmbeddingPass and the weight passes)")

    def call(self, model: ir.Model) -> StatsResult:
        graph = model.graph
        site = build_layer_map(graph).linears[HEAD]
        hidden = site.node.inputs[0]
        keep = ir.Value(name=LOGITS_TO_KEEP, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]),
                        const_value=ir.tensor(np.array(0, dtype=np.int64), name=LOGITS_TO_KEEP))
        graph.inputs.append(keep)
        graph.register_initializer(keep)  # the default a caller may override
        zero = add_initializer(graph, f"{LOGITS_TO_KEEP}.zero", np.array([0], dtype=np.int64))  # [1]: Slice's starts
        axes = add_initializer(graph, f"{LOGITS_TO_KEEP}.axes", np.array([1], dtype=np.int64))
        end = add_initializer(graph, f"{LOGITS_TO_KEEP}.end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
        nodes = []

        def op(op_type: str, *inputs: ir.Value) -> ir.Value:
            node = ir.node(op_type, inputs=list(inputs), name=f"{LOGITS_TO_KEEP}/{op_type}_{len(nodes)}",
                           metadata_props=dict(site.node.metadata_props))
            nodes.append(node)
            return node.outputs[0]

        start = op("Where", op("Greater", keep, zero), op("Neg", keep), zero)  # [-k], or [0]: every position
        sliced = op("Slice", hidden, start, end, axes)
        sliced.type, sliced.name = hidden.type, f"{hidden.name}.kept"
        if hidden.shape is not None:
            dims = list(hidden.shape)
            sliced.shape = ir.Shape([dims[0], LOGITS_SEQUENCE, *dims[2:]])
        graph.insert_before(site.node, nodes)
        site.node.replace_input_with(0, sliced)
        for value in graph.outputs:
            if value.name == LOGITS and value.shape is not None and len(value.shape) == 3:
                value.shape = ir.Shape([value.shape[0], LOGITS_SEQUENCE, value.shape[2]])
        stats = KeepLastLogitsStats(input_added=LOGITS_TO_KEEP, head_node=site.node.name or "")
        return StatsResult(model, modified=True, stats=stats)
