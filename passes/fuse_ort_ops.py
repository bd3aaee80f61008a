"""Rewrite the exported graph to onnxruntime's fused contrib ops with onnxscript's ORT fusion rules.

`onnxscript.rewriter.ort_fusions.optimize_for_ort` (0.7.2) runs its transformer fusions (RMSNorm,
skip-RMSNorm, rotary, SDPA → MHA/GQA, GELU) and returns rule counts. Rule counts overstate what
is left: intermediate fusions that no later rule consumes are inlined back (rotary matches, but
becomes com.microsoft RotaryEmbedding only with the cos/sin-cache fusion). So the stats count the
fused ops actually in the graph afterwards; `missing_fusions` tells a whole fusion stage which
expected fusions are absent, and why.

Before it, one rule of ours drops the exporter's NaN guard behind every attention softmax,
Where(IsNaN(p), 0, p): the mask adds finfo.min, not -inf, so p is never NaN and the guard is an
exact no-op that only hides the attention pattern. Ordering: the weight passes run before this one
(fusion turns MatMul(x, Transpose(W)) into FusedMatMul, which they do not read); the pass marks the
model as fused, which their `requires` and FuseGroupQueryAttentionPass's check.
"""

from __future__ import annotations

import collections
import dataclasses

import onnx_ir as ir

from edgecompress.passes.graph_edits import FUSED_MARK, StatsResult, check_no_dangling_values, require_unfused

# Expected fusion -> (fused op types that show it happened, why it may be absent).
EXPECTED = {
    "RMSNorm": (("SimplifiedLayerNormalization",), "no x·rsqrt(mean(x²)+eps)·w pattern matched"),
    "SkipRMSNorm": (("SkipSimplifiedLayerNormalization",), "no residual Add feeding an RMSNorm matched"),
    "RotaryEmbedding": (
        ("RotaryEmbedding",),
        "the rotary pattern matches, but the cos/sin-cache fusion does not (the export computes cos/sin"
        " once from position_ids for all layers), so the intermediate op is inlined back",
    ),
    "GQA": (
        ("GroupQueryAttention", "MultiHeadAttention", "Attention"),
        "the SDPA → MHA/GQA rules did not match the attention: they need the key and value caches to"
        " share one symbolic past length (the export names one Dim for all of them)",
    ),
    "MatMul+Add": (
        (),
        "no rule in onnxscript's ORT fusions; onnxruntime's session optimizer fuses 2-D MatMul+Add itself,"
        " and llama has no Linear biases",
    ),
    "SiLU-mul": ((), "no onnxruntime contrib op or onnxscript rule for x·sigmoid(x)·up on CPU"),
}


@dataclasses.dataclass
class FuseOrtOpsStats:
    nan_guards_removed: int = 0
    rule_counts: dict[str, int] = dataclasses.field(default_factory=dict)  # onnxscript's, nonzero only
    fused_ops: dict[str, int] = dataclasses.field(default_factory=dict)  # op type -> count added
    nodes_before: int = 0
    nodes_after: int = 0


def _nan_guard_rule():
    from onnxscript.rewriter import pattern

    def guarded(op, probs):
        return op.Where(op.IsNaN(probs), 0.0, probs)

    def is_softmax(context, probs, **_):
        producer = probs.producer()
        return producer is not None and producer.op_type == "Softmax"

    return pattern.RewriteRule(guarded, lambda op, probs: op.Identity(probs), is_softmax)


def op_type_counts(graph: ir.Graph) -> collections.Counter:
    return collections.Counter(node.op_type for node in graph)


def missing_fusions(before: collections.Counter, after: collections.Counter,
                    rotary_in_attention: bool = False) -> dict[str, str]:
    """Expected fusion -> why it is absent, from op-type counts before and after a fusion stage.
    `rotary_in_attention`: every GroupQueryAttention rotates q/k itself, so no RotaryEmbedding is missing."""
    return {
        fusion: reason
        for fusion, (ops, reason) in EXPECTED.items()
        if not any(after[op] > before.get(op, 0) for op in ops)
        and not (fusion == "RotaryEmbedding" and rotary_in_attention)
    }


class FuseOrtOpsPass(ir.passes.InPlacePass):
    """onnxscript's ORT fusions on the whole graph, with counts of the fused ops they leave."""

    def __init__(self, debug: bool = False):
        super().__init__()
        self.debug = debug

    def requires(self, model: ir.Model) -> None:
        require_unfused(model, type(self).__name__)

    def ensures(self, model: ir.Model) -> None:
        check_no_dangling_values(model.graph)

    def call(self, model: ir.Model) -> StatsResult:
        from onnxscript.rewriter import RewritePass
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        stats = FuseOrtOpsStats(nodes_before=len(model.graph))
        before = op_type_counts(model.graph)
        guards = RewritePass([_nan_guard_rule()])
        guards(model)
        stats.nan_guards_removed = before["IsNaN"] - op_type_counts(model.graph)["IsNaN"]
        defaults = _detach_input_defaults(model.graph)
        try:
            fused, rule_counts = optimize_for_ort(model, debug=self.debug)
        finally:
            _restore_input_defaults(model.graph, defaults)
        if fused is not model:  # 0.7.2 works in place; keep the pass honest if that changes
            raise RuntimeError("optimize_for_ort returned a new model; FuseOrtOpsPass expects in-place")
        after = op_type_counts(model.graph)
        stats.rule_counts = {name: count for name, count in rule_counts.items() if count}
        fused_types = {node.op_type for node in model.graph if node.domain == "com.microsoft"}
        fused_types.add("SimplifiedLayerNormalization")  # an ONNX-domain op onnxruntime runs fused
        stats.fused_ops = {
            op: after[op] - before.get(op, 0) for op in sorted(fused_types) if after[op] > before.get(op, 0)
        }
        stats.nodes_after = len(model.graph)
        model.metadata_props[FUSED_MARK] = "1"
        modified = stats.nodes_after != stats.nodes_before or bool(stats.fused_ops)
        return StatsResult(model, modified=modified, stats=stats)


def _detach_input_defaults(graph: ir.Graph) -> dict[str, ir.TensorProtocol]:
    """Inputs with a default (an initializer of the same name, e.g. logits_to_keep) become plain inputs while
    onnxscript optimizes: it would drop them from the inputs and fold them as constants."""
    defaults = {}
    for value in graph.inputs:
        if value.is_initializer():
            defaults[value.name] = value.const_value
            graph.initializers.pop(value.name)
            value.const_value = None
    return defaults


def _restore_input_defaults(graph: ir.Graph, defaults: dict[str, ir.TensorProtocol]) -> None:
    for value in graph.inputs:
        if value.name in defaults:
            value.const_value = defaults[value.name]
            graph.register_initializer(value)
