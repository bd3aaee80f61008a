"""Rewrite the `ai.edgecompress` ops into standard ONNX, for runtimes without our library.

Each op becomes the graph `kernels/reference.py` describes, with X's leading dims kept (any rank,
dynamic batch and sequence, empty batch): X is flattened to [n, b, p] blocks, the products are
batched MatMuls over the block axis, and Y is reshaped back to X's leading dims + [N].

- LowRankMatMul → MatMul(X, A), MatMul(·, B) (+ Add bias); the pair carries the low-rank factor marks
  SplitLowRankPass writes, so FuseLowRankPass can fuse it back.
- MonarchMatMul → Transpose to [b, n, p] · W1 → the stride permutation as Reshape [b, n, b, s] /
  Transpose / Reshape [b, n, R] → · W2 → Transpose/Reshape to [..., N].
- BlastMatMul → · V per input block, the coupling Σ_l (·)[l] ⊙ S[l, k] as one batched MatMul over r
  ([r, n, l]·[r, l, k]), then · U per output block. Measured on onnxruntime CPU (1 thread, 576↔1536,
  128 tokens) against Mul by S + ReduceSum over l, which materialises a b× larger [l, n, k, r] tensor:
  2.8x faster at b=16, even at b=8, 1.2x slower at b=4; the MatMul form's worst case is the milder.

The intermediates are stored in X's dtype, as the reference rounds them.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from edgecompress.kernels.reference import DOMAIN, OPS
from edgecompress.passes.graph_edits import StatsResult, add_initializer, check_no_dangling_values
from edgecompress.passes.layer_map import LOW_RANK_FACTOR_KEY, PassInputError
from edgecompress.structures import BY_OP

MIN_OPSET = 17  # Shape(start, end) and ReduceSum's axes input are older; 17 is what our exports use


@dataclasses.dataclass
class LowerCustomOpsStats:
    lowered: dict[str, int] = dataclasses.field(default_factory=dict)  # op -> nodes rewritten
    kept: dict[str, int] = dataclasses.field(default_factory=dict)  # op -> nodes left (not in `ops`)
    domain_import_removed: bool = False


class LowerCustomOpsPass(ir.passes.InPlacePass):
    """Lower the custom ops named in `ops` (all of them by default) to standard ONNX ops."""

    def __init__(self, ops: Iterable[str] | None = None):
        super().__init__()
        self.ops = tuple(OPS if ops is None else ops)
        unknown = sorted(set(self.ops) - set(OPS))
        if unknown:
            raise PassInputError(f"unknown custom op(s) {', '.join(unknown)}; {DOMAIN} has {', '.join(OPS)}")

    def requires(self, model: ir.Model) -> None:
        nodes = [node for node in model.graph if self._lowers(node)]
        if not nodes:
            return
        opset = model.graph.opset_imports.get("", 0)
        if opset < MIN_OPSET:
            raise PassInputError(f"lowering {DOMAIN} ops needs ONNX opset {MIN_OPSET} or newer, the model has {opset}")
        for node in nodes:
            _check_inputs(node)

    def ensures(self, model: ir.Model) -> None:
        left = [node.name for node in model.graph if self._lowers(node)]
        if left:
            raise ir.passes.PostconditionError(f"{DOMAIN} nodes left unlowered: {left[:3]}")
        check_no_dangling_values(model.graph)

    def _lowers(self, node: ir.Node) -> bool:
        return node.domain == DOMAIN and node.op_type in self.ops

    def call(self, model: ir.Model) -> StatsResult:
        graph = model.graph
        lowered: collections.Counter = collections.Counter()
        kept: collections.Counter = collections.Counter()
        for node in list(graph):
            if node.domain != DOMAIN:
                continue
            if node.op_type not in self.ops:
                kept[node.op_type] += 1
                continue
            BY_OP[node.op_type].lower()(_Builder(graph, node), *node.inputs)
            lowered[node.op_type] += 1
        removed = False
        if not any(node.domain == DOMAIN for node in graph) and DOMAIN in graph.opset_imports:
            del graph.opset_imports[DOMAIN]
            model.opset_imports.pop(DOMAIN, None)
            removed = True
        stats = LowerCustomOpsStats(dict(sorted(lowered.items())), dict(sorted(kept.items())), removed)
        return StatsResult(model, modified=bool(lowered) or removed, stats=stats)


def _check_inputs(node: ir.Node) -> None:
    """Weights must have static shapes: block counts and ranks are read from them."""
    names = ("X", *BY_OP[node.op_type].factor_names)
    inputs = list(node.inputs)
    if len(inputs) not in (len(names), len(names) + 1) or any(value is None for value in inputs[: len(names)]):
        raise PassInputError(f"{node.op_type} node {node.name!r} has {len(inputs)} inputs, expected {', '.join(names)}[, bias]")
    for name, value in zip(names[1:], inputs[1:]):
        shape = value.shape
        if shape is None or not shape.is_static():
            raise PassInputError(f"{node.op_type} node {node.name!r}: weight {name} ({value.name!r}) has no static shape")


class _Builder:
    """Inserts standard nodes before `node`, then hands its output over to the last of them."""

    def __init__(self, graph: ir.Graph, node: ir.Node):
        self.graph, self.node = graph, node
        self.x = node.inputs[0]
        self.metadata = dict(node.metadata_props)
        self.count = 0

    def op(self, op_type: str, *inputs: ir.Value, mark: str | None = None, **attributes) -> ir.Value:
        self.count += 1
        metadata = {**self.metadata, LOW_RANK_FACTOR_KEY: mark} if mark else dict(self.metadata)
        new = ir.node(op_type, list(inputs), attributes, name=f"{self.node.name}_{op_type}_{self.count}",
                      metadata_props=metadata)
        out = new.outputs[0]
        out.name = f"{self.node.outputs[0].name}_lowered_{self.count}"
        if op_type != "Shape" and op_type != "Concat":
            out.type = self.x.type
        self.graph.insert_before(self.node, new)
        return out

    def ints(self, label: str, values: list[int]) -> ir.Value:
        return add_initializer(self.graph, f"{self.node.name}_{label}", np.array(values, dtype=np.int64))

    def to_blocks(self, blocks: int, per_block: int) -> ir.Value:
        """X [..., b·p] → [b, n, p]."""
        rows = self.op("Reshape", self.x, self.ints("blocks_shape", [-1, blocks, per_block]))
        return self.op("Transpose", rows, perm=[1, 0, 2])

    def from_blocks(self, y_blocks: ir.Value, out_features: int) -> ir.Value:
        """[b, n, q] → [..., b·q] with X's leading dims."""
        rows = self.op("Transpose", y_blocks, perm=[1, 0, 2])
        return self.reshape_like_x(rows, out_features)

    def reshape_like_x(self, value: ir.Value, out_features: int) -> ir.Value:
        lead = self.op("Shape", self.x, end=-1)
        shape = self.op("Concat", lead, self.ints("out_features", [out_features]), axis=0)
        return self.op("Reshape", value, shape)

    def finish(self, y: ir.Value, bias: ir.Value | None) -> None:
        if bias is not None:
            y = self.op("Add", y, bias)
        old = self.node.outputs[0]
        name = old.name
        old.replace_all_uses_with(y, replace_graph_outputs=True)
        y.shape, y.type = old.shape or y.shape, old.type or y.type
        self.graph.remove(self.node, safe=True)
        y.name = name


def _lower_low_rank(build: _Builder, x, a, b, bias=None) -> None:
    t = build.op("MatMul", x, a, mark="A")
    build.finish(build.op("MatMul", t, b, mark="B"), bias)


def _lower_monarch(build: _Builder, x, w1, w2, bias=None) -> None:
    blocks, per_in, channels, per_out = (int(d) for d in (*w1.shape, w2.shape[2]))
    rank = channels // blocks
    z = build.op("MatMul", build.to_blocks(blocks, per_in), w1)  # [l, n, k·s + t]
    z = build.op("Reshape", z, build.ints("split_channels", [blocks, -1, blocks, rank]))  # [l, n, k, t]
    z = build.op("Transpose", z, perm=[2, 1, 0, 3])  # [k, n, l, t]
    z = build.op("Reshape", z, build.ints("routed_shape", [blocks, -1, channels]))  # [k, n, l·s + t]
    build.finish(build.from_blocks(build.op("MatMul", z, w2), blocks * per_out), bias)


def _lower_blast(build: _Builder, x, u, s, v, bias=None) -> None:
    blocks, per_in = int(v.shape[0]), int(v.shape[1])
    per_out = int(u.shape[2])
    y_blocks = build.op("MatMul", build.to_blocks(blocks, per_in), v)  # [l, n, r]
    by_rank = build.op("Transpose", y_blocks, perm=[2, 1, 0])  # [r, n, l]
    s_by_rank = build.op("Transpose", s, perm=[2, 0, 1])  # [r, l, k]; folded by onnxruntime
    z = build.op("MatMul", by_rank, s_by_rank)  # [r, n, k]
    z = build.op("Transpose", z, perm=[2, 1, 0])  # [k, n, r]
    build.finish(build.from_blocks(build.op("MatMul", z, u), blocks * per_out), bias)


