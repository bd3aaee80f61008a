"""What each node of a decoder graph does: its role (attention, MLP, low-rank factor, norm...) and layer.

The role table follows docs "profiler-and-targets" §B.3, plus two roles of this project: `low_rank`
(the two MatMuls SplitLowRankPass makes of a replaced Linear, so a profile shows what compression
bought) and `custom_op` (ops in a domain onnxruntime does not ship). Evidence is read in a fixed
order, most reliable first: the node's op, its low-rank mark, then the module path the exporter
recorded, the node's name (genai-builder style `/model/layers.0/attn/q_proj/MatMul`), and the names of
the weights it reads (`model.layers.1.mlp.up_proj.nbits_b`).
"""

from __future__ import annotations

import re

from edgecompress.runtimes.profiler.onnx_graph import Graph, Node

ROLES = ("embed", "attn_proj", "attn_core", "attn_out", "mlp", "low_rank", "norm", "rope", "lm_head",
         "custom_op", "memcpy", "other")
# Domains onnxruntime implements itself; an op anywhere else is a custom op (the project's kernels).
BUILTIN_DOMAINS = {"", "ai.onnx", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.ml", "com.ms.internal.nhwc",
                   "org.pytorch.aten"}
ATTENTION_OPS = {"GroupQueryAttention", "Attention", "MultiHeadAttention", "PagedAttention", "Softmax",
                 "SparseAttention"}
NORM_OPS = re.compile(r"LayerNorm|RMSNorm|SimplifiedLayerNormalization")
# Name patterns, tried in order on each piece of text evidence.
NAME_PATTERNS = (
    ("lm_head", re.compile(r"lm_head")),
    ("embed", re.compile(r"embed_tokens|wte\b|tok_embeddings")),
    ("low_rank", re.compile(r"low_rank")),
    ("attn_proj", re.compile(r"(^|[./_])(q|k|v|qkv)_proj")),
    ("attn_out", re.compile(r"(^|[./_])o_proj")),
    ("mlp", re.compile(r"gate_proj|up_proj|down_proj|(^|[./])mlp([./]|$)")),
    ("norm", re.compile(r"norm")),
    ("rope", re.compile(r"rotary|rope")),
    ("attn_core", re.compile(r"(^|[./])(self_attn|attn|attention)([./]|$)")),
)
LAYER = re.compile(r"layers[./](\d+)")


def _weight_names(node: Node, graph: Graph) -> list[str]:
    return [name for name in node.inputs if name in graph.initializers]


def node_role(node: Node, graph: Graph) -> str:
    if node.domain not in BUILTIN_DOMAINS:
        return "custom_op"
    if node.low_rank and not node.op_type.startswith("Memcpy"):
        return "low_rank"
    return _op_role(node.op_type) or _name_role((node.scope, node.name, *_weight_names(node, graph)))


def _op_role(op_type: str) -> str | None:
    """Roles the op type alone decides."""
    if op_type.startswith("Memcpy"):
        return "memcpy"
    if op_type in ATTENTION_OPS:
        return "attn_core"
    if NORM_OPS.search(op_type):
        return "norm"
    if op_type == "RotaryEmbedding":
        return "rope"
    return None


def _name_role(texts) -> str:
    """The first NAME_PATTERNS role found in the texts (scope, node name, weight names), else other."""
    for text in texts:
        for role, pattern in NAME_PATTERNS:
            if text and pattern.search(text):
                return role
    return "other"


def node_layer(node: Node) -> int | None:
    for text in (node.scope, node.name, *node.inputs):
        match = LAYER.search(text or "")
        if match:
            return int(match.group(1))
    return None


def role_of_op(op_type: str, name: str) -> str:
    """For trace events with no graph node (onnxruntime inserts some, e.g. `Gather_token_38`)."""
    return _op_role(op_type) or _name_role((name,))


class NodeIndex:
    """Trace event names -> graph nodes. onnxruntime keeps the origin's name on fused nodes and appends
    `/<FusionName>/` (`node_silu/QuickGeluFusion/`), so an unknown name falls back to its first segment."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.by_name = {node.name: node for node in graph.nodes}

    def find(self, event_name: str) -> Node | None:
        name = event_name
        for suffix in ("_kernel_time", "_fence_before", "_fence_after"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        if name in self.by_name:
            return self.by_name[name]
        head = name.split("/", 1)[0]
        if head in self.by_name:
            return self.by_name[head]
        # genai-style names ("/model/layers.0/attn/q_proj/MatMul/SomeFusion"): the longest known prefix
        parts = name.split("/")
        for end in range(len(parts) - 1, 1, -1):
            prefix = "/".join(parts[:end])
            if prefix in self.by_name:
                return self.by_name[prefix]
        return None
