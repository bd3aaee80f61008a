"""Factor the tied embedding table: K exact rows plus a·b, one set of tensors for the lookup and the head.

The dynamo export of a tied model reads E [V, d] twice: embedding = Gather(E, input_ids) in the Embedding's
scope, and logits = MatMul(h, Eᵀ) in the lm_head's, Eᵀ a second initializer (the exporter folds the
transpose) or a Transpose of E. With the plan's token order (the K exact token ids first, then the rest):

    lookup = Where(Gather(is_exact [V, 1], ids),
                   Gather(exact [K, d], Gather(exact_row [V], ids)),
                   MatMul(Gather(a_by_token [V, r], ids), b [r, d]))
    logits = ScatterElements(MatMul(MatMul(h, Transpose(b)), Transpose(a_by_token)),
                             Expand(exact_ids [K], Shape(e)), e = MatMul(h, Transpose(exact)), axis=-1)

a_by_token is a in token order with zero rows at the K exact tokens (the scatter overwrites their logits,
their lookup comes from `exact`): K·r stored zeros, counted apart from the parameters. Not Concat + one
Gather back into token order on the logits: onnxruntime's Gather on the last axis copies element by element,
about 200 ms more per 512-token prefill on 2 cores than the scatter (bench/embedding_factor.py measures both).

Weight formats: QuantizeWeightsPass takes the three head MatMuls (constant weights behind a Transpose, the
tied lm_head's own form); the lookup's MatMul by b stays float (marked), as the dense lookup table does.
MapGgufWeightsPass skips the lm_head (the model is marked). Ordering, checked in `requires`: on the float
export, before the weight passes and FuseOrtOpsPass; once.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgecompress.passes.graph_edits import (
    StatsResult,
    add_initializer,
    check_no_dangling_values,
    drop_if_unused,
    require_unfused,
)
from edgecompress.passes.layer_map import LinearSite, PassInputError, build_layer_map, module_of_class
from edgecompress.passes.quantize_weights import KEEP_FLOAT_KEY

# Model metadata: the tied table is factored (MapGgufWeightsPass's reason to skip the lm_head).
FACTORED_MARK = "edgecompress.factored_embedding"
# Node metadata: which side of the factored table a node computes ("lookup" or "head").
FACTORED_ROLE_KEY = "edgecompress.factored_embedding_role"
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


@dataclasses.dataclass
class FactorEmbeddingStats:
    module: str = ""
    vocab: int = 0
    hidden: int = 0
    rank: int = 0
    exact_tokens: int = 0
    params_before: int = 0  # V·d: the tied table once
    params_after: int = 0  # K·d + (V−K)·r + r·d
    zero_row_bytes: int = 0  # a_by_token's K zero rows (not parameters)
    index_bytes: int = 0  # is_exact, exact_row, exact_ids (not parameters)
    initializers_removed: list[str] = dataclasses.field(default_factory=list)
    bytes_removed: int = 0  # the dense table(s): the export stores E and Eᵀ
    bytes_added: int = 0  # factors, zero rows and index tables
    nodes_removed: int = 0
    nodes_added: int = 0


@dataclasses.dataclass
class _Sites:
    lookup: ir.Node  # Gather(E, ids)
    head: LinearSite  # MatMul(h, Eᵀ)

    @property
    def table(self) -> ir.Value:
        return self.lookup.inputs[0]


class FactorEmbeddingPass(ir.passes.InPlacePass):
    """Rewrite the tied embedding lookup and lm_head of `module` / `head` to the factors
    exact [K, d], a [V−K, r], b [r, d] and order [V] (token ids, the exact ones first)."""

    def __init__(self, exact, a, b, order, module: str = "model.embed_tokens", head: str = "lm_head"):
        super().__init__()
        self.exact, self.a, self.b = (np.asarray(array) for array in (exact, a, b))
        self.order = np.asarray(order)
        self.module, self.head = module, head

    @classmethod
    def from_plan(cls, plan) -> FactorEmbeddingPass:
        """From a CompressionPlan's `embedding` entry and its `<module>.exact/.a/.b/.order` factors."""
        entry = plan.embedding
        if entry is None:
            raise PassInputError("the plan has no factored embedding")
        arrays = [plan.factors.get(entry.factor_key(name)) for name in ("exact", "a", "b", "order")]
        if any(array is None for array in arrays):
            raise PassInputError(f"plan factors miss {entry.module}.exact/.a/.b/.order")
        return cls(*arrays, module=entry.module, head=entry.head)

    def requires(self, model: ir.Model) -> None:
        require_unfused(model, type(self).__name__)
        if model.metadata_props.get(FACTORED_MARK) == "1":
            raise PassInputError("the embedding table of this graph is already factored")
        self._check_factors(self._sites(model.graph))

    def ensures(self, model: ir.Model) -> None:
        check_no_dangling_values(model.graph)

    def call(self, model: ir.Model) -> StatsResult:
        graph = model.graph
        sites = self._sites(graph)
        nodes_before = len(graph)
        stats = self._shape_stats()
        tables = _token_tables(self.exact, self.a, self.b, self.order, sites.table.const_value.dtype.numpy())
        values = {name: add_initializer(graph, f"{self.module}.{name}", array) for name, array in tables.items()}
        stats.bytes_added = sum(array.nbytes for array in tables.values())
        stats.index_bytes = sum(tables[name].nbytes for name in ("is_exact", "exact_row", "exact_ids"))
        stats.zero_row_bytes = self.exact.shape[0] * tables["a_by_token"].shape[1] * tables["a_by_token"].itemsize
        dense = [sites.table, sites.head.node.inputs[1]]
        stats.nodes_added = _rewrite_lookup(graph, sites.lookup, values) + _rewrite_head(graph, sites.head.node, values)
        for value in dense:
            source = _initializer_behind(value)
            drop_if_unused(graph, value)
            if source is not None and source.name not in graph.initializers:
                stats.initializers_removed.append(source.name)
                stats.bytes_removed += source.const_value.nbytes
        stats.nodes_removed = nodes_before + stats.nodes_added - len(graph)
        model.metadata_props[FACTORED_MARK] = "1"
        return StatsResult(model, modified=True, stats=stats)

    def _shape_stats(self) -> FactorEmbeddingStats:
        (k, d), (rest, r) = self.exact.shape, self.a.shape
        v = k + rest
        return FactorEmbeddingStats(module=self.module, vocab=v, hidden=d, rank=r, exact_tokens=k,
                                    params_before=v * d, params_after=k * d + rest * r + r * d)

    def _sites(self, graph: ir.Graph) -> _Sites:
        found = [node for node in graph if node.op_type == "Gather" and node.domain == ""
                 and module_of_class(node, "Embedding") == self.module and _constant(node.inputs[0])]
        if len(found) != 1:
            raise PassInputError(f"embedding {self.module!r} maps to {len(found)} Gathers of a constant table, "
                                 "expected 1")
        lookup = found[0]
        if lookup.attributes.get_int("axis", 0) != 0 or lookup.inputs[0].dtype not in FLOAT_TYPES:
            raise PassInputError(f"embedding {self.module!r} is not a float row lookup (Gather axis 0)")
        head = build_layer_map(graph).find_linear(self.head)
        if head.node.op_type != "MatMul" or head.bias_node is not None:
            raise PassInputError(f"{self.head!r} is a {head.node.op_type}{' with a bias' if head.bias_node else ''}: "
                                 "only a bias-free MatMul head is factored")
        return _Sites(lookup, head)

    def _check_factors(self, sites: _Sites) -> None:
        table = sites.table.const_value.numpy()
        v, d = table.shape
        exact, a, b, order = self.exact, self.a, self.b, self.order
        k, r = exact.shape[0], b.shape[0]
        shapes_ok = (exact.shape == (k, d) and a.shape == (v - k, r) and b.shape == (r, d) and order.shape == (v,)
                     and 1 <= k < v and r >= 1)
        if not shapes_ok:
            raise PassInputError(f"embedding factors {exact.shape}, {a.shape}, {b.shape}, {order.shape} do not give "
                                 f"the graph's [{v}, {d}] table")
        if order.dtype.kind not in "iu" or not (np.sort(order) == np.arange(v)).all():
            raise PassInputError("embedding factor order is not a permutation of the vocabulary")
        head = sites.head
        if head.weight is not sites.table:
            weight = head.weight.const_value.numpy()
            if not np.array_equal(weight.T if head.weight_is_transposed else weight, table):
                raise PassInputError(f"{self.head!r} does not read the embedding table: embedding factorization "
                                     "needs a tied lm_head")


def factored_head_nodes(graph: ir.Graph, scatter: ir.Node) -> list[ir.Node]:
    """The float nodes of a factored head whose ScatterElements is `scatter` (what an fp32 lm_head keeps
    fp32 on fp16 escalation); empty for any other ScatterElements."""
    if scatter.metadata_props.get(FACTORED_ROLE_KEY) != "head":
        return []
    return [node for node in graph if node.metadata_props.get(FACTORED_ROLE_KEY) == "head"
            and node.op_type in ("MatMul", "Transpose", "ScatterElements")]


def _constant(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer() and value.const_value is not None and len(value.shape) == 2


def _initializer_behind(value: ir.Value) -> ir.Value | None:
    """The initializer `value` is, or the one its Transpose reads."""
    if value.is_initializer():
        return value
    producer = value.producer()
    return producer.inputs[0] if producer is not None and producer.inputs[0].is_initializer() else None


def _token_tables(exact, a, b, order, dtype) -> dict[str, np.ndarray]:
    """The graph's initializers: the factors (a in token order) and the index tables."""
    k = exact.shape[0]
    position = np.argsort(order)  # each token's row in the factored order
    a_by_token = np.zeros((order.size, a.shape[1]), dtype)
    a_by_token[order[k:]] = a
    return {
        "exact": exact.astype(dtype), "a_by_token": a_by_token, "b": b.astype(dtype),
        # int32 indices: half the bytes, and onnx's shape inference does not try to propagate them as shapes
        "is_exact": (position < k)[:, None], "exact_row": np.where(position < k, position, 0).astype(np.int32),
        "exact_ids": order[:k].astype(np.int32),
    }


class _Builder:
    """Appends nodes that carry one module's exporter metadata (the profiler's roles read it) and a role."""

    def __init__(self, like: ir.Node, role: str):
        self.metadata = {**like.metadata_props, FACTORED_ROLE_KEY: role}
        self.prefix, self.nodes = f"{like.name or role}_factored", []

    def __call__(self, op: str, inputs, dtype: ir.DataType | None, attributes=None, **extra) -> ir.Value:
        node = ir.node(op, inputs, attributes or {}, name=f"{self.prefix}_{len(self.nodes)}_{op.lower()}",
                       metadata_props={**self.metadata, **extra})
        node.outputs[0].name = node.name
        if dtype is not None:
            node.outputs[0].type = ir.TensorType(dtype)
        self.nodes.append(node)
        return node.outputs[0]


def _take_over(graph: ir.Graph, old: ir.Node, new: ir.Value) -> None:
    """`new` replaces `old`'s output (name, type, shape, uses, graph outputs); `old` is removed."""
    output = old.outputs[0]
    new.type, new.shape = output.type, output.shape
    output.replace_all_uses_with(new, replace_graph_outputs=True)
    name, output.name = output.name, f"{output.name}_dense"
    new.name = name
    graph.remove(old, safe=True)


def _rewrite_lookup(graph: ir.Graph, gather: ir.Node, values: dict[str, ir.Value]) -> int:
    ids, dtype = gather.inputs[1], gather.inputs[0].dtype
    node = _Builder(gather, "lookup")
    is_exact = node("Gather", [values["is_exact"], ids], ir.DataType.BOOL)
    exact = node("Gather", [values["exact"], node("Gather", [values["exact_row"], ids], ir.DataType.INT32)], dtype)
    rows = node("Gather", [values["a_by_token"], ids], dtype)
    rest = node("MatMul", [rows, values["b"]], dtype, **{KEEP_FLOAT_KEY: "factored embedding lookup"})
    result = node("Where", [is_exact, exact, rest], dtype)
    graph.insert_before(gather, node.nodes)
    _take_over(graph, gather, result)
    return len(node.nodes)


def _rewrite_head(graph: ir.Graph, matmul: ir.Node, values: dict[str, ir.Value]) -> int:
    hidden, dtype = matmul.inputs[0], values["exact"].dtype
    node = _Builder(matmul, "head")

    def transposed(name: str) -> ir.Value:
        return node("Transpose", [values[name]], dtype, {"perm": [1, 0]})

    exact = node("MatMul", [hidden, transposed("exact")], dtype)
    rest = node("MatMul", [node("MatMul", [hidden, transposed("b")], dtype), transposed("a_by_token")], dtype)
    indices = node("Expand", [values["exact_ids"], node("Shape", [exact], ir.DataType.INT64)], ir.DataType.INT32)
    logits = node("ScatterElements", [rest, indices, exact], dtype, {"axis": -1})
    graph.insert_before(matmul, node.nodes)
    _take_over(graph, matmul, logits)
    return len(node.nodes)
