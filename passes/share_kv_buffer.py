"""Let each present KV cache be written in place into its past's buffer (onnxruntime-genai's shared buffer).

GroupQueryAttention can write the new tokens' key/value into a preallocated [batch, kv_heads, capacity,
head_dim] buffer when its past and present are bound to the same memory: no copy of the whole cache per
decoded token. Two things in an exported graph stand in the way, and this pass removes the first and
checks the second:

- the export reads the past length from the past cache's shape (`Shape(past, start=2, end=3)`, Hugging
  Face's `past_key_values.get_seq_length()`), which is the capacity once the buffer is shared. The pass
  reads it from the inputs instead: attention_mask's width minus the new tokens (the contract says the mask
  covers past + new tokens), the same value for an unshared cache;
- every present must be GroupQueryAttention's own present output for the matching past (a Concat would
  write a new buffer), and nothing else may read the past but a Shape of its batch/head axes.

The model is then marked with `contract.SHARED_KV_BUFFER`, which the runtimes and the genai config read.
The graph still runs with an unshared, growing cache exactly as before. Ordering: after
FuseGroupQueryAttentionPass (checked: the presents must come from it).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from edgecompress import contract
from edgecompress.passes.graph_edits import (StatsResult, check_no_dangling_values, graph_input, require_fused,
                                             shape_range)

_SEQUENCE_AXIS = 2


@dataclasses.dataclass
class ShareKvBufferStats:
    shared: bool = False
    past_length_reads: int = 0  # Shape(past)[2] reads rewritten to the mask's width - new tokens
    refused: str = ""  # why the cache cannot be shared (the graph is left as it was)


def _past_length_reads(past: ir.Value) -> list[ir.Node] | str:
    """The Shape(past, 2, 3) nodes to rewrite, or why this past cannot be a shared buffer."""
    reads = []
    for node in past.consumers():
        if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft":
            continue
        if node.op_type != "Shape" or node.domain:
            return f"{past.name} is read by {node.op_type} {node.name!r}, not only by GroupQueryAttention"
        start, end = shape_range(node)
        if end is not None and 0 <= start < end <= _SEQUENCE_AXIS:
            continue  # batch / heads: the same for the buffer
        if (start, end) != (_SEQUENCE_AXIS, _SEQUENCE_AXIS + 1):
            return f"{past.name}'s shape is read as [{start}:{end}]"
        reads.append(node)
    return reads


def _present_writer_problem(graph: ir.Graph, present: ir.Value) -> str | None:
    match = present.name and contract.PAST_INPUT.match(contract.PAST_PREFIX + present.name[len(contract.PRESENT_PREFIX):])
    producer = present.producer()
    if not match or producer is None or producer.op_type != "GroupQueryAttention":
        return f"{present.name} is not written by GroupQueryAttention"
    slot = 1 + contract.KV_KINDS.index(match.group(2))
    past_name = contract.KV_NAMES[f"past_{match.group(2)}"] % int(match.group(1))
    past = producer.inputs[2 + slot] if len(producer.inputs) > 2 + slot else None
    if producer.outputs[slot] is not present or past is None or past.name != past_name:
        return f"{present.name} is not GroupQueryAttention's present for {past_name}"
    return None


class ShareKvBufferPass(ir.passes.InPlacePass):
    """Past length from attention_mask, presents checked in place: the KV cache may be one shared buffer."""

    def requires(self, model: ir.Model) -> None:
        require_fused(model, type(self).__name__)

    def ensures(self, model: ir.Model) -> None:
        check_no_dangling_values(model.graph)

    def call(self, model: ir.Model) -> StatsResult:
        graph = model.graph
        stats = ShareKvBufferStats()
        reads = self._reads_to_rewrite(graph, stats)
        if reads is None:
            return StatsResult(model, modified=False, stats=stats)
        if reads:
            past_length = self._past_length(graph, before=next(iter(graph)))  # reads only graph inputs
            for node in reads:
                node.outputs[0].replace_all_uses_with(past_length, replace_graph_outputs=True)
                graph.remove(node, safe=True)
        stats.past_length_reads, stats.shared = len(reads), True
        model.metadata_props[contract.SHARED_KV_BUFFER] = "1"
        return StatsResult(model, modified=True, stats=stats)

    def _reads_to_rewrite(self, graph: ir.Graph, stats: ShareKvBufferStats) -> list[ir.Node] | None:
        pasts = [value for value in graph.inputs if contract.PAST_INPUT.match(value.name or "")]
        presents = [value for value in graph.outputs if contract.is_kv_name(value.name or "")
                    and value.name.startswith(contract.PRESENT_PREFIX)]
        problem = None
        if not pasts or len(presents) != len(pasts):
            problem = "the graph has no KV cache, or not one present per past"
        elif graph_input(graph, contract.ATTENTION_MASK) is None or graph_input(graph, contract.INPUT_IDS) is None:
            problem = f"no {contract.ATTENTION_MASK} or {contract.INPUT_IDS} input to read the past length from"
        problem = problem or next(filter(None, (_present_writer_problem(graph, p) for p in presents)), None)
        reads: list[ir.Node] = []
        for past in pasts if problem is None else ():
            found = _past_length_reads(past)
            if isinstance(found, str):
                problem = found
                break
            reads += found
        if problem:
            stats.refused = problem
            return None
        return reads

    def _past_length(self, graph: ir.Graph, before: ir.Node) -> ir.Value:
        """int64 [1]: attention_mask's width - input_ids' length (what Shape(past)[2:3] gives unshared)."""
        total = ir.node("Shape", [graph_input(graph, contract.ATTENTION_MASK)], attributes={"start": 1, "end": 2},
                        name="shared_kv_total_length")
        new = ir.node("Shape", [graph_input(graph, contract.INPUT_IDS)], attributes={"start": 1, "end": 2},
                      name="shared_kv_new_length")
        past = ir.node("Sub", [total.outputs[0], new.outputs[0]], name="shared_kv_past_length")
        graph.insert_before(before, [total, new, past])
        return past.outputs[0]
