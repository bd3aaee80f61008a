"""Carry GGUF low-bit weights into MatMulNBits without re-quantizing them.

A GGUF file that already holds 4- or 8-bit blocks defines the model: its fp32 export is the
dequantized blocks. Mapping the blocks themselves (not the fp32 values) onto MatMulNBits adds no
rounding of its own:

    Q8_0  w = d·q,     q in −128..127  →  bits 8, code q+128, scale d, implicit zero point 128 (exact)
    Q4_1  w = d·q + m, q in 0..15, block 32, two forms:
      "block_sum" (default): x·wᵀ = MatMulNBits(x; q, d, zero point 0) + (x·E)·mᵀ, where E [K, n_blocks]
          sums x over each block. d·q and m are both held exactly (a 4-bit code times an fp16 scale is
          exact in fp32); only the summation order changes. onnxruntime's fast int8-activation kernel
          (accuracy_level 4) takes uint8 zero points: smollm2-135m decodes in 52 ms vs 387 ms per step.
      "float_zero_point": bits 4, scale d, float zero point z = −m/d: one op, weights within 1 ulp
          ((q − z)·d vs d·q + m), but onnxruntime 1.32 runs float zero points on a slow fp32 path.
          A block with d = 0 holds the constant m: codes 0, z = −1, scale m, which is exact.

Exact weights are not exact arithmetic: accuracy_level 4 rounds activations to int8 per block (as
llama.cpp does for Q4_1 with Q8_1), accuracy_level None computes in fp32. The blocks come in torch's
row order (the caller undoes llama.cpp's q/k rope permutation), and the pass checks them against the
float weight still in the graph before replacing it, so a wrong row order or a weight changed since
(a low-rank split) is caught instead of silently shipped. Ordering, checked in `requires`: on the float
graph, before FuseOrtOpsPass; QuantizeWeightsPass afterwards takes every MatMul this pass left float.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgecompress.passes.factor_embedding import FACTORED_MARK
from edgecompress.passes.graph_edits import StatsResult, add_initializer, require_unfused
from edgecompress.passes.layer_map import LOW_RANK_FACTOR_KEY, PassInputError, build_layer_map
from edgecompress.passes.quantize_weights import KEEP_FLOAT_KEY, MatMulSite, NBitsWeight, replace_with_nbits

GGUF_BLOCK = 32
KINDS = ("Q4_1", "Q8_0")
Q4_1_FORMS = ("block_sum", "float_zero_point")
FACTORED_HEAD_REASON = "the tied table is factored (FactorEmbeddingPass): the GGUF blocks are no longer its weight"


@dataclasses.dataclass
class GgufBlocks:
    """One [N, K] weight as GGUF blocks along K, rows in torch order."""

    kind: str  # "Q4_1" or "Q8_0"
    codes: np.ndarray  # [N, K]: uint8 0..15 (Q4_1) or int8 (Q8_0)
    scales: np.ndarray  # d, [N, K / 32], float32 (from the file's fp16)
    mins: np.ndarray | None = None  # m, [N, K / 32], Q4_1 only

    def dequantize(self) -> np.ndarray:
        """The values a GGUF reader gives: float32 d·q (+ m), what the fp32 export holds."""
        n, k = self.codes.shape
        codes = self.codes.reshape(n, -1, GGUF_BLOCK).astype(np.float32)
        weight = self.scales[..., None] * codes
        if self.mins is not None:
            weight = weight + self.mins[..., None]
        return weight.reshape(n, k)


def to_nbits(blocks: GgufBlocks, q4_1_form: str = "block_sum") -> NBitsWeight:
    """The MatMulNBits weight for `blocks`; Q4_1 in "block_sum" form leaves out the mins (added apart)."""
    if blocks.kind == "Q8_0":
        codes = (blocks.codes.astype(np.int16) + 128).astype(np.uint8)
        return NBitsWeight(codes, blocks.scales.astype(np.float32), None, 8, GGUF_BLOCK)
    if blocks.kind != "Q4_1":
        raise PassInputError(f"GGUF block kind {blocks.kind!r} has no exact MatMulNBits form; known: {KINDS}")
    d, m = blocks.scales.astype(np.float32), blocks.mins.astype(np.float32)
    if q4_1_form == "block_sum":
        return NBitsWeight(blocks.codes.astype(np.uint8), d, np.zeros(d.shape, np.uint8), 4, GGUF_BLOCK)
    constant = d == 0
    safe_d = np.where(constant, 1.0, d).astype(np.float32)
    scales = np.where(constant, m, d).astype(np.float32)
    zero_points = np.where(constant, -1.0, -m / safe_d).astype(np.float32)
    codes = blocks.codes.reshape(*d.shape, GGUF_BLOCK).copy()
    codes[constant] = 0
    return NBitsWeight(codes.reshape(blocks.codes.shape).astype(np.uint8), scales, zero_points, 4, GGUF_BLOCK)


@dataclasses.dataclass
class MapGgufWeightsStats:
    matmuls_mapped: dict[str, int] = dataclasses.field(default_factory=dict)  # kind -> count
    lm_head_mapped: bool = False
    q4_1_form: str = "block_sum"
    constant_blocks: int = 0  # Q4_1 blocks with d == 0 (float_zero_point form)
    max_abs_diff: float = 0.0  # dequantized blocks vs the graph's float weights, before replacing
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # module -> reason


class MapGgufWeightsPass(ir.passes.InPlacePass):
    """Replace the Linears named in `blocks` (module name -> GgufBlocks) by exact MatMulNBits.

    `tolerance`: largest allowed |dequantized − graph weight| before replacing (the fp32 export is
    the same dequantization, so anything beyond rounding means the blocks are not this weight).
    """

    def __init__(
        self,
        blocks: dict[str, GgufBlocks],
        accuracy_level: int | None = None,
        tolerance: float = 1e-6,
        q4_1_form: str = "block_sum",
    ):
        super().__init__()
        if q4_1_form not in Q4_1_FORMS:
            raise PassInputError(f"Q4_1 form must be one of {Q4_1_FORMS}, got {q4_1_form!r}")
        self.blocks, self.accuracy_level, self.tolerance = blocks, accuracy_level, tolerance
        self.q4_1_form = q4_1_form

    def requires(self, model: ir.Model) -> None:
        require_unfused(model, type(self).__name__)

    def call(self, model: ir.Model) -> StatsResult:
        stats = MapGgufWeightsStats(q4_1_form=self.q4_1_form)
        graph = model.graph
        linears = build_layer_map(graph).linears
        factored = model.metadata_props.get(FACTORED_MARK) == "1"
        for module, blocks in self.blocks.items():
            site = linears.get(module)
            reason = FACTORED_HEAD_REASON if factored and module == "lm_head" else self._skip_reason(site, blocks)
            if reason:
                stats.skipped[module] = reason
                continue
            matmul = MatMulSite(site.node, site.weight, transposed_view=not site.weight_is_transposed)
            diff = float(np.abs(blocks.dequantize() - matmul.weight_nk().astype(np.float32)).max())
            if diff > self.tolerance:
                raise PassInputError(
                    f"GGUF blocks of {module!r} differ from the graph's weight by {diff:.3g}"
                    " (row order or source mismatch)")
            stats.max_abs_diff = max(stats.max_abs_diff, diff)
            nbits = to_nbits(blocks, self.q4_1_form)
            add_mins = blocks.kind == "Q4_1" and self.q4_1_form == "block_sum"
            if blocks.kind == "Q4_1" and not add_mins:
                stats.constant_blocks += int((blocks.scales == 0).sum())
            node = replace_with_nbits(graph, matmul, nbits, self.accuracy_level, module)
            if add_mins:
                _add_block_sum_term(graph, node, module, blocks.mins)
            stats.matmuls_mapped[blocks.kind] = stats.matmuls_mapped.get(blocks.kind, 0) + 1
            stats.lm_head_mapped |= module == "lm_head"
        return StatsResult(model, modified=bool(stats.matmuls_mapped), stats=stats)

    @staticmethod
    def _skip_reason(site, blocks: GgufBlocks) -> str | None:
        if site is None:
            return "no MatMul Linear of that name in the graph"
        if site.node.op_type != "MatMul":
            return f"{site.node.op_type} is not rewritten"
        if site.node.metadata_props.get(LOW_RANK_FACTOR_KEY):
            return "split into low-rank factors: the GGUF blocks are no longer its weight"
        if (site.out_features, site.in_features) != blocks.codes.shape:
            return f"graph weight is [{site.out_features}, {site.in_features}], blocks are {list(blocks.codes.shape)}"
        if blocks.codes.shape[1] % GGUF_BLOCK:
            return f"K={blocks.codes.shape[1]} is not a multiple of {GGUF_BLOCK}"
        return None


def _add_block_sum_term(graph: ir.Graph, nbits: ir.Node, module: str, mins: np.ndarray) -> None:
    """y = MatMulNBits(x) + (x·E)·mᵀ; the Add takes over the MatMulNBits output's name and uses."""
    n_blocks = mins.shape[1]
    k = n_blocks * GGUF_BLOCK
    e_name = f"gguf.block_sum_{k}"  # one block-indicator matrix per K, shared by every Linear with that K
    if e_name in graph.initializers:
        e_value = graph.initializers[e_name]
    else:
        e_value = add_initializer(graph, e_name, np.repeat(np.eye(n_blocks, dtype=np.float32), GGUF_BLOCK, axis=0))
    m_value = add_initializer(graph, f"{module}.gguf_mins_t", np.ascontiguousarray(mins.T.astype(np.float32)))
    # The Linear's module scopes keep the layer map's view of the decoder layer whole; the mark keeps
    # QuantizeWeightsPass off these float MatMuls.
    metadata = {**nbits.metadata_props, KEEP_FLOAT_KEY: "GGUF Q4_1 min term"}
    sums = ir.node("MatMul", [nbits.inputs[0], e_value], name=f"{nbits.name}_block_sums", metadata_props=metadata)
    term = ir.node("MatMul", [sums.outputs[0], m_value], name=f"{nbits.name}_mins", metadata_props=metadata)
    output = nbits.outputs[0]
    add = ir.node("Add", [term.outputs[0], term.outputs[0]], name=f"{nbits.name}_add_mins", metadata_props=metadata)
    result = add.outputs[0]
    result.type, result.shape = output.type, output.shape
    output.replace_all_uses_with(result, replace_graph_outputs=True)
    add.replace_input_with(0, output)  # only now, so the rewiring above does not loop the Add onto itself
    graph.insert_after(nbits, [sums, term, add])
    name = output.name
    output.name = f"{name}_without_mins"
    result.name = name
