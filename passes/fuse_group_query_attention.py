"""Rewrite MultiHeadAttention over an expanded KV cache into onnxruntime's GroupQueryAttention.

After FuseOrtOpsPass a llama-style GQA layer still reads its cache the PyTorch way:

    present.i.key = Concat(past_key_values.i.key, k_new)          # [B, kv_heads, T, D], a graph output
    key = Reshape(Transpose(Reshape(Expand(Unsqueeze(present.i.key)))))  # repeated to all heads, BSH
    out = MultiHeadAttention(query, key, value, attention_bias=mask)

so every decode step copies the whole cache, repeated num_heads/kv_heads times, into a new buffer.
GroupQueryAttention takes the new tokens' key/value in BSH and the past in BNSH, shares each KV head
between its query heads itself and returns the present cache. The rewrite feeds it k_new/v_new
(transposed to BSH), the graph's past inputs, and the same additive mask (padding and causality stay
exactly what the export computed; rotary stays outside, applied by the export from position_ids, so
left-padded batches keep their per-row positions). seqlens_k is total length − 1 for every row:
padded keys are masked by the bias, not cut by length. The old Concat/Expand chain becomes dead and
is removed.

Rotary inside (when the build hands the pass the model's `RotaryCaches`): where q and k are Hugging Face's
half-split rotary on a projection (passes/rotary_pattern.py) with the cos/sin every layer shares, the
projections go to GroupQueryAttention unrotated with `do_rotary=1` and cos/sin caches [max_positions, D/2],
and the export's per-layer rotary ops become dead. The kernel takes positions from seqlens_k (0..S-1 for a
prompt, then the cache length), not from position_ids: a left-padded row is rotated at positions shifted by
its padding, the same shift for its queries and keys, so its attention scores are unchanged (rotary
depends on position differences only). Key and value reach the op in BSH straight from their projections
where the heads view is a plain Reshape + Transpose.

Limitation (onnxruntime's kernel, reported in the stats): a batch of more than one row cannot feed
several new tokens over a non-empty cache in one call; prefill of a batch and batched one-token decode
work, as does a multi-token continuation of a single row. Ordering, checked in `requires`: after
FuseOrtOpsPass, whose MultiHeadAttention nodes this pass rewrites.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from edgecompress import contract
from edgecompress.passes.graph_edits import (StatsResult, add_initializer, check_no_dangling_values, graph_input,
                                             require_fused)
from edgecompress.passes.rotary_pattern import heads_source, match_rotary, read_shapes_before_rotary

_CHAIN = ("Reshape", "Transpose", "Reshape", "Expand", "Unsqueeze")


@dataclasses.dataclass(frozen=True)
class RotaryCaches:
    """cos/sin of every position up to the model's maximum, [max_positions, D/2] float32 (the first half of
    Hugging Face's repeated frequencies, its attention scaling applied): the model's own rotary module's."""

    cos: np.ndarray
    sin: np.ndarray


@dataclasses.dataclass
class FuseGroupQueryAttentionStats:
    fused: int = 0
    rotary_inside: int = 0  # layers whose q/k rotary moved into the op
    rotary_outside: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> layers (when caches given)
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count
    limitations: list[str] = dataclasses.field(default_factory=list)


def _cache_concat(value: ir.Value | None) -> ir.Node | None:
    """The Concat(past, new) behind an MHA key/value input, if it is the exporter's repeat chain."""
    for op_type in _CHAIN:
        node = value.producer() if value is not None else None
        if node is None or node.op_type != op_type:
            return None
        value = node.inputs[0]
    concat = value.producer() if value is not None else None
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2:
        return None
    past = concat.inputs[0]
    if past is None or not past.is_graph_input() or not concat.outputs[0].is_graph_output():
        return None
    return concat


def _bnsh_of_bsh(bsh: ir.Value) -> ir.Value | None:
    """x when bsh = Reshape(Transpose(x, perm=[0, 2, 1, 3])): MultiHeadAttention's query from the BNSH heads."""
    reshape = bsh.producer() if bsh is not None else None
    if reshape is None or reshape.op_type != "Reshape":
        return None
    transpose = reshape.inputs[0].producer() if reshape.inputs[0] is not None else None
    if transpose is None or transpose.op_type != "Transpose" or list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    return transpose.inputs[0]


def _bsh(graph: ir.Graph, before: ir.Node, bnsh: ir.Value, shape: ir.Value, name: str) -> ir.Value:
    """bnsh in BSH: its projection where it is a plain heads view of one, else Transpose + Reshape."""
    source = heads_source(bnsh)
    if source is not None:
        return source
    transpose = ir.node("Transpose", [bnsh], attributes={"perm": [0, 2, 1, 3]}, name=f"{name}_bsnh")
    reshape = ir.node("Reshape", [transpose.outputs[0], shape], name=f"{name}_bsh")
    graph.insert_before(before, [transpose, reshape])
    return reshape.outputs[0]


class FuseGroupQueryAttentionPass(ir.passes.InPlacePass):
    """MultiHeadAttention + repeated KV cache → com.microsoft GroupQueryAttention, layer by layer."""

    def __init__(self, rotary: RotaryCaches | None = None):
        super().__init__()
        self.rotary = rotary

    def requires(self, model: ir.Model) -> None:
        require_fused(model, type(self).__name__)

    def ensures(self, model: ir.Model) -> None:
        check_no_dangling_values(model.graph)

    def call(self, model: ir.Model) -> StatsResult:
        graph = model.graph
        stats = FuseGroupQueryAttentionStats()
        attentions = [node for node in graph if node.op_type == "MultiHeadAttention" and node.domain == "com.microsoft"]
        mask_input = graph_input(graph, contract.ATTENTION_MASK)
        if not attentions or mask_input is None:
            if attentions:
                stats.skipped[f"no {contract.ATTENTION_MASK} input"] = len(attentions)
            return StatsResult(model, modified=False, stats=stats)
        self._lengths_values = None
        self._rotary_values: dict[str, ir.Value] = {}  # the graph's cos/sin and our caches, from the first layer
        for mha in attentions:
            reason = self._rewrite(graph, mha, mask_input, stats)
            if reason:
                stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
            else:
                stats.fused += 1
        if stats.fused:
            ir.passes.common.RemoveUnusedNodesPass()(model)
            stats.limitations.append(
                "onnxruntime's GroupQueryAttention refuses batch > 1 with several new tokens over a non-empty cache"
            )
        return StatsResult(model, modified=stats.fused > 0, stats=stats)

    def _rewrite(self, graph: ir.Graph, mha: ir.Node, mask_input: ir.Value, stats) -> str | None:
        inputs = list(mha.inputs) + [None] * (8 - len(mha.inputs))
        query, key, value, bias, padding, attention_bias, past_k, past_v = inputs[:8]
        if bias is not None or padding is not None or past_k is not None or past_v is not None:
            return "MultiHeadAttention with a projection bias, padding mask or its own past"
        if mha.attributes.get_int("unidirectional", 0):
            return "unidirectional MultiHeadAttention"
        key_concat, value_concat = _cache_concat(key), _cache_concat(value)
        if key_concat is None or value_concat is None:
            return "key/value are not the exporter's repeated KV cache"
        new_key = key_concat.inputs[1]
        kv_heads = new_key.shape[1] if new_key.shape is not None else None
        heads = mha.attributes.get_int("num_heads")
        if not isinstance(kv_heads, int) or heads % kv_heads:
            return "KV head count unknown or not a divisor of the query heads"
        if self._lengths_values is None:
            self._lengths_values = self._lengths(graph, mha, mask_input)
        seqlens_k, total, bsh_shape = self._lengths_values
        name = mha.name or "gqa"
        rotary = self._rotary_inputs(graph, query, new_key, stats)
        attributes = {"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": int(rotary is not None)}
        scale = mha.attributes.get("scale")
        if scale is not None:
            attributes["scale"] = scale.as_float()
        query, new_key, cos_cache, sin_cache = rotary or (query, new_key, None, None)
        gqa_inputs = [
            query,
            new_key if rotary else _bsh(graph, mha, new_key, bsh_shape, f"{name}_key"),
            _bsh(graph, mha, value_concat.inputs[1], bsh_shape, f"{name}_value"),
            key_concat.inputs[0],
            value_concat.inputs[0],
            seqlens_k,
            total,
            cos_cache,
            sin_cache,
            None,  # position_ids: positions follow seqlens_k (see the module docstring on left padding)
            attention_bias,
        ]
        gqa = ir.node(
            "GroupQueryAttention", gqa_inputs, attributes=attributes, domain="com.microsoft", num_outputs=3,
            name=f"{name}_gqa", metadata_props=dict(mha.metadata_props),
        )
        graph.insert_before(mha, gqa)
        mha.outputs[0].replace_all_uses_with(gqa.outputs[0], replace_graph_outputs=True)
        for concat, present in ((key_concat, gqa.outputs[1]), (value_concat, gqa.outputs[2])):
            old = concat.outputs[0]
            present.shape, present.type = old.shape, old.type
            index = list(graph.outputs).index(old)
            output_name = old.name
            old.name = f"{output_name}_unfused"
            present.name = output_name
            graph.outputs[index] = present
        gqa.outputs[0].shape, gqa.outputs[0].type = mha.outputs[0].shape, mha.outputs[0].type
        return None

    def _rotary_inputs(self, graph: ir.Graph, query: ir.Value, new_key: ir.Value, stats):
        """(q projection, k projection, cos cache, sin cache) for do_rotary, or None (rotary stays outside)."""
        if self.rotary is None:
            return None
        reason = None
        q = match_rotary(_bnsh_of_bsh(query))
        k = match_rotary(new_key)
        if q is None or k is None:
            reason = "q/k are not Hugging Face's half-split rotary on a projection"
        elif q.cos is not k.cos or q.sin is not k.sin:
            reason = "q and k use different cos/sin"
        elif (2 * q.half) % 16:
            reason = "heads of a size that is not a multiple of 16 (onnxruntime's rotary kernel)"
        elif q.half != self.rotary.cos.shape[1]:
            reason = f"rotary over {2 * q.half} dims, the caches hold {2 * self.rotary.cos.shape[1]}"
        elif self._rotary_values and (q.cos is not self._rotary_values["cos"] or q.sin is not self._rotary_values["sin"]):
            reason = "a different cos/sin than the first fused layer's"
        if reason:
            stats.rotary_outside[reason] = stats.rotary_outside.get(reason, 0) + 1
            return None
        if not self._rotary_values:
            dtype = np.float32
            self._rotary_values = {
                "cos": q.cos, "sin": q.sin,
                "cos_cache": add_initializer(graph, "gqa_cos_cache", self.rotary.cos.astype(dtype)),
                "sin_cache": add_initializer(graph, "gqa_sin_cache", self.rotary.sin.astype(dtype)),
            }
        stats.rotary_inside += 1
        input_ids = graph_input(graph, contract.INPUT_IDS)
        read_shapes_before_rotary(graph, q, input_ids)
        read_shapes_before_rotary(graph, k, input_ids)
        return q.projection, k.projection, self._rotary_values["cos_cache"], self._rotary_values["sin_cache"]

    def _lengths(self, graph: ir.Graph, before: ir.Node, mask_input: ir.Value):
        """seqlens_k [B] int32 (= T − 1 per row), total_sequence_length int32 scalar, and [0, 0, -1]."""
        shape = ir.node("Shape", [mask_input], name="gqa_mask_shape")
        batch = ir.node("Shape", [mask_input], attributes={"start": 0, "end": 1}, name="gqa_batch")
        total64 = ir.node("Gather", [shape.outputs[0], add_initializer(graph, "gqa_one_index", np.array(1, np.int64))],
                          attributes={"axis": 0}, name="gqa_total64")
        total = ir.node("Cast", [total64.outputs[0]], attributes={"to": ir.DataType.INT32}, name="gqa_total")
        minus_one = ir.node("Sub", [total.outputs[0], add_initializer(graph, "gqa_one_i32", np.array(1, np.int32))],
                            name="gqa_total_minus_one")
        seqlens = ir.node("Expand", [minus_one.outputs[0], batch.outputs[0]], name="gqa_seqlens_k")
        nodes = [shape, batch, total64, total, minus_one, seqlens]
        graph.insert_before(before, nodes)
        bsh_shape = add_initializer(graph, "gqa_bsh_shape", np.array([0, 0, -1], np.int64))
        return seqlens.outputs[0], total.outputs[0], bsh_shape
