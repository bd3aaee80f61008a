"""Quantize MatMul weights to onnxruntime's block-wise `com.microsoft::MatMulNBits`.

Every MatMul(x, W) whose W is a 2-D float initializer [K, N] (a dense Linear, either low-rank
factor, a bare MatMul) or Transpose(initializer [N, K]) (the exporter's form of a tied lm_head)
becomes MatMulNBits(x, B, scales[, zero_points]) with

    B            uint8 [N, n_blocks, block_size * bits / 8], codes packed low nibble first along K
    scales       [N * n_blocks], the weight's float dtype
    zero_points  uint8 [N * ceil(n_blocks * bits / 8)] (packed like B) or float [N * n_blocks];
                 absent means 2^(bits-1)
    weight       w[n, k] = (code - zero_point) * scale

K is zero-padded up to whole blocks (the op reads n_blocks = ceil(K / block_size)). The new node
keeps the old output value, so names, graph outputs and consumers are untouched. Ordering, checked
in `requires`: before FuseOrtOpsPass (fusion hides weights in FusedMatMul). Run it after
SplitLowRankPass too: both factors are quantized like any other MatMul, and a Linear that is
already MatMulNBits can no longer be split.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx_ir as ir

from edgecompress.passes.graph_edits import StatsResult, add_initializer, drop_if_unused, require_unfused
from edgecompress.passes.layer_map import PassInputError, build_layer_map, constant_weight

MS_DOMAIN = "com.microsoft"
BLOCK_SIZES = (32, 64, 128)
BITS = (4, 8)
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
# Metadata on a MatMul that must stay float (e.g. the exact GGUF Q4_1 min term): never quantized.
KEEP_FLOAT_KEY = "edgecompress.keep_float"


@dataclasses.dataclass
class NBitsWeight:
    """One weight in MatMulNBits form. codes: uint8 [N, n_blocks * block_size] (unpacked, padded)."""

    codes: np.ndarray
    scales: np.ndarray  # [N, n_blocks]
    zero_points: np.ndarray | None  # [N, n_blocks], uint8 or float; None = 2^(bits-1)
    bits: int
    block_size: int

    def dequantize(self, k: int) -> np.ndarray:
        """The [N, K] float32 weight the op computes with (numpy reference)."""
        n, n_blocks = self.scales.shape
        codes = self.codes.reshape(n, n_blocks, self.block_size).astype(np.float32)
        zero = np.float32(2 ** (self.bits - 1)) if self.zero_points is None else self.zero_points
        zero = np.asarray(zero, dtype=np.float32)
        zero = zero[..., None] if zero.ndim else zero
        weight = (codes - zero) * self.scales.astype(np.float32)[..., None]
        return weight.reshape(n, -1)[:, :k]


@dataclasses.dataclass
class MatMulSite:
    node: ir.Node
    weight: ir.Value  # the initializer
    transposed_view: bool  # True when the initializer is W [N, K] read through a Transpose

    def weight_nk(self) -> np.ndarray:
        array = self.weight.const_value.numpy()
        return array if self.transposed_view else array.T


@dataclasses.dataclass
class QuantizeWeightsStats:
    matmuls_quantized: int = 0
    lm_head_quantized: bool = False
    params_quantized: int = 0
    bytes_before: int = 0  # float weights of the quantized MatMuls
    bytes_after: int = 0  # B + scales + zero points
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count


def check_format(bits: int, block_size: int, accuracy_level: int | None) -> None:
    if bits not in BITS:
        raise PassInputError(f"weight bits must be one of {BITS}, got {bits}")
    if block_size not in BLOCK_SIZES:
        raise PassInputError(f"block size must be one of {BLOCK_SIZES}, got {block_size}")
    if accuracy_level is not None and accuracy_level not in range(5):
        raise PassInputError(f"accuracy level must be 0..4 or None, got {accuracy_level}")


def quantize_blocks(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> NBitsWeight:
    """Round-to-nearest block quantization of an [N, K] weight along K."""
    n, k = weight.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight
    blocks = padded.reshape(n, n_blocks, block_size)
    top = 2**bits - 1
    if symmetric:
        # Codes in [0, 2^bits - 1] around the implicit zero point 2^(bits-1): ±absmax maps to ±(2^(bits-1)-1).
        half = 2 ** (bits - 1)
        scales = np.abs(blocks).max(axis=2) / (half - 1)
        safe = np.where(scales == 0, 1.0, scales)
        codes = np.clip(np.rint(blocks / safe[..., None]) + half, 0, top)
        zero_points = None
    else:
        # The range includes 0 so the zero point is a code and exact zeros stay exact.
        low = np.minimum(blocks.min(axis=2), 0)
        high = np.maximum(blocks.max(axis=2), 0)
        scales = (high - low) / top
        safe = np.where(scales == 0, 1.0, scales)
        zero_points = np.clip(np.rint(-low / safe), 0, top).astype(np.uint8)
        codes = np.clip(np.rint(blocks / safe[..., None]) + zero_points[..., None], 0, top)
    return NBitsWeight(codes.astype(np.uint8).reshape(n, -1), scales.astype(np.float32), zero_points, bits, block_size)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes along the last axis, low bits first (4-bit: element 2i in the low nibble)."""
    if bits == 8:
        return codes.astype(np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def find_matmul_sites(graph: ir.Graph) -> tuple[list[MatMulSite], dict[str, int]]:
    """MatMuls with a 2-D float constant weight; and counts of skipped weight-like MatMuls by reason."""
    sites, skipped = [], collections.Counter()
    for node in graph:
        if node.op_type == "Gemm" and node.domain == "":
            skipped["Gemm is not rewritten"] += 1
        if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) != 2:
            continue
        if KEEP_FLOAT_KEY in node.metadata_props:
            skipped[f"kept float: {node.metadata_props[KEEP_FLOAT_KEY]}"] += 1
            continue
        found = constant_weight(node.inputs[1])
        if found is None:
            continue
        weight, transposed_view = found
        if weight.const_value.dtype not in FLOAT_TYPES:
            skipped[f"weight dtype {weight.const_value.dtype.name}"] += 1
        elif len(weight.shape) != 2:
            skipped["weight is not 2-D"] += 1
        else:
            sites.append(MatMulSite(node, weight, transposed_view))
    return sites, dict(skipped)


def replace_with_nbits(
    graph: ir.Graph, site: MatMulSite, weight: NBitsWeight, accuracy_level: int | None, name: str
) -> ir.Node:
    """Swap `site.node` for a MatMulNBits computing with `weight`; returns the new node."""
    node = site.node
    dtype = site.weight.const_value.dtype.numpy()
    n, k = (site.weight.shape[0], site.weight.shape[1]) if site.transposed_view else (
        site.weight.shape[1], site.weight.shape[0])
    n_blocks = weight.scales.shape[1]
    packed = pack_codes(weight.codes, weight.bits).reshape(n, n_blocks, -1)
    inputs = [
        node.inputs[0],
        add_initializer(graph, f"{name}.nbits_b", packed),
        add_initializer(graph, f"{name}.nbits_scales", weight.scales.astype(dtype).reshape(-1)),
    ]
    if weight.zero_points is not None:
        if weight.zero_points.dtype == np.uint8:
            zero_points = pack_codes(weight.zero_points, weight.bits).reshape(-1)
        else:
            zero_points = weight.zero_points.astype(dtype).reshape(-1)
        inputs.append(add_initializer(graph, f"{name}.nbits_zero_points", zero_points))
    attributes = {"K": k, "N": n, "bits": weight.bits, "block_size": weight.block_size}
    if accuracy_level is not None:
        attributes["accuracy_level"] = accuracy_level
    new = ir.node(
        "MatMulNBits", inputs, attributes, domain=MS_DOMAIN, name=f"{node.name}_nbits",
        metadata_props=dict(node.metadata_props),
    )
    graph.insert_before(node, new)
    output, new_output = node.outputs[0], new.outputs[0]
    new_output.type, new_output.shape = output.type, output.shape
    output.replace_all_uses_with(new_output, replace_graph_outputs=True)
    new_output.name = output.name
    old_weight = node.inputs[1]
    graph.remove(node, safe=True)
    drop_if_unused(graph, old_weight)
    graph.opset_imports.setdefault(MS_DOMAIN, 1)
    return new


def site_name(site: MatMulSite, modules: dict[ir.Node, str]) -> str:
    return modules.get(site.node) or site.weight.name or site.node.name


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Round-to-nearest block quantization of every constant-weight MatMul to MatMulNBits."""

    def __init__(
        self,
        bits: int = 4,
        block_size: int = 32,
        symmetric: bool = False,
        accuracy_level: int | None = None,
        include_lm_head: bool = True,
    ):
        super().__init__()
        check_format(bits, block_size, accuracy_level)
        self.bits, self.block_size, self.symmetric = bits, block_size, symmetric
        self.accuracy_level, self.include_lm_head = accuracy_level, include_lm_head

    def requires(self, model: ir.Model) -> None:
        require_unfused(model, type(self).__name__)

    def ensures(self, model: ir.Model) -> None:
        left = [site.node.name for site in find_matmul_sites(model.graph)[0]]
        if left and self.include_lm_head:
            raise ir.passes.PostconditionError(f"constant-weight MatMuls left unquantized: {left[:3]}")

    def call(self, model: ir.Model) -> StatsResult:
        stats = QuantizeWeightsStats()
        graph = model.graph
        try:
            linears = build_layer_map(graph).linears  # module names and the lm_head; optional otherwise
        except PassInputError:
            if not self.include_lm_head:
                raise
            linears = {}
        modules = {site.node: name for name, site in linears.items()}
        lm_head = linears["lm_head"].node if "lm_head" in linears else None
        sites, skipped = find_matmul_sites(graph)
        for site in sites:
            if site.node is lm_head and not self.include_lm_head:
                skipped["lm_head excluded"] = skipped.get("lm_head excluded", 0) + 1
                continue
            weight_nk = site.weight_nk()
            nbits = quantize_blocks(weight_nk.astype(np.float32), self.bits, self.block_size, self.symmetric)
            stats.bytes_before += weight_nk.nbytes
            stats.params_quantized += weight_nk.size
            node = replace_with_nbits(graph, site, nbits, self.accuracy_level, site_name(site, modules))
            stats.bytes_after += sum(value.const_value.nbytes for value in node.inputs[1:])
            stats.matmuls_quantized += 1
            stats.lm_head_quantized |= site.node is lm_head
        stats.skipped = skipped
        return StatsResult(model, modified=stats.matmuls_quantized > 0, stats=stats)
