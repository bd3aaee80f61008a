"""Roofline estimates from the graph itself: bytes moved and FLOPs per step, against a target's peaks.

Decode step (batch b, `past` cached tokens), docs "profiler-and-targets" §F.4:
  bytes = every initializer read by a compute node (MatMulNBits packed weights, scales and zero points
          included) + one embedding row per token for gather-only tables
          + KV read 2·L·n_kv·d·past·s·b + KV write 2·L·n_kv·d·s·b
          + activations Σ_linear (K + N)·s·b
  FLOPs = b·(2·Σ K·N + 4·L·n_heads·d·(past + 1))
Prefill of T tokens after `past`: the weights once, everything else per token; attention sums the
keys each position sees. est = max(bytes / (BW·η_bw), FLOPs / (peak·η_c)), labelled an estimate
everywhere: no number here is measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgecompress import contract
from edgecompress.runtimes.profiler.onnx_graph import Graph

LINEAR_OPS = {"MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul"}
LABEL = "estimate (roofline from the graph's bytes and FLOPs and the target's peaks; not measured)"


@dataclass
class GraphCost:
    weight_bytes: int  # read once per step
    gather_row_bytes: int  # read per token (embedding lookups)
    linear_kn: int  # Σ K·N over the linear layers
    linear_k_plus_n: int  # Σ (K + N): activations in and out of each linear layer, per token
    layers: int
    kv_heads: int
    heads: int
    head_dim: int
    elem_bytes: int  # KV and activation element size

    def kv_token_bytes(self) -> int:
        """Key + value of one token in every layer."""
        return contract.kv_cache_bytes(self.layers, self.kv_heads, self.head_dim, 1, self.elem_bytes)

    def step(self, tokens: int, past: int, batch: int = 1) -> dict:
        """Bytes and FLOPs of one forward call of `tokens` new tokens after `past` cached ones."""
        attended = tokens * past + tokens * (tokens + 1) // 2  # keys seen, summed over the new positions
        kv = self.kv_token_bytes() * batch
        bytes_moved = (self.weight_bytes + self.gather_row_bytes * tokens * batch + kv * past + kv * tokens
                       + self.linear_k_plus_n * self.elem_bytes * tokens * batch)
        flops = batch * (2 * self.linear_kn * tokens + 4 * self.layers * self.heads * self.head_dim * attended)
        return {"tokens": tokens, "past": past, "batch": batch, "bytes": int(bytes_moved), "flops": int(flops),
                "weight_bytes": self.weight_bytes, "kv_read_bytes": kv * past, "kv_write_bytes": kv * tokens}


def _weight_dims(name: str, graph: Graph, producers: dict) -> tuple[int, ...] | None:
    """Dims of a constant weight: an initializer, or a Transpose of one (a tied lm_head reads the
    embedding table as MatMul(x, Transpose(table)), which onnxruntime folds once at load)."""
    if name in graph.initializers:
        return graph.initializers[name].dims
    node = producers.get(name)
    if node is not None and node.op_type == "Transpose" and node.inputs and node.inputs[0] in graph.initializers:
        dims = graph.initializers[node.inputs[0]].dims
        return tuple(reversed(dims)) if len(dims) == 2 else None
    return None


def _linear_kn(node, graph: Graph, producers: dict) -> tuple[int, int] | None:
    if node.op_type == "MatMulNBits":
        return node.ints.get("K", 0), node.ints.get("N", 0)
    dims = _weight_dims(node.inputs[1], graph, producers) if len(node.inputs) > 1 else None
    if dims is None or len(dims) != 2:
        return None  # activation x activation (attention scores)
    rows, cols = dims
    if node.op_type == "Gemm" and node.ints.get("transB", 0):
        rows, cols = cols, rows
    return rows, cols


def weight_bytes(graph: Graph) -> tuple[int, int]:
    """(bytes of every initializer a step reads in full, bytes of one row of each gather-only table).
    A table only a Gather reads at its data input (the embedding) costs one row per token."""
    full, gathered = set(), {}
    for node in graph.nodes:
        for index, name in enumerate(node.inputs):
            if name not in graph.initializers:
                continue
            if node.op_type == "Gather" and index == 0:
                gathered[name] = graph.initializers[name]
            else:
                full.add(name)
    rows = sum(init.nbytes // max(init.dims[0], 1) for name, init in gathered.items() if name not in full and init.dims)
    return sum(graph.initializers[name].nbytes for name in full), rows


def graph_cost(graph: Graph, layers: int, kv_heads: int, heads: int, head_dim: int, elem_bytes: int) -> GraphCost:
    full, rows = weight_bytes(graph)
    kn = k_plus_n = 0
    producers = {output: node for node in graph.nodes for output in node.outputs}
    for node in graph.nodes:
        if node.op_type in LINEAR_OPS and (dims := _linear_kn(node, graph, producers)):
            kn += dims[0] * dims[1]
            k_plus_n += dims[0] + dims[1]
    return GraphCost(full, rows, kn, k_plus_n, layers, kv_heads, heads, head_dim, elem_bytes)


def bandwidth(target, jetson: dict | None, emc_live_mhz: float | None) -> tuple[float | None, str]:
    """The target's bandwidth; on a Jetson with `emc_bus_bits`, recomputed from the EMC clock."""
    if target.emc_bus_bits and jetson is not None:
        mhz, source = (emc_live_mhz, "emc_live") if emc_live_mhz else (jetson.get("emc_max_mhz"), "emc_max")
        if mhz:
            return round(mhz * 2 * target.emc_bus_bits / 8 / 1000, 1), source
    return target.memory_bandwidth_gbs, "profile"


def estimate(cost: dict, bw_gbs: float | None, peak_tflops: float | None, target, measured_ms: float | None) -> dict:
    """Time of one call at the target's peaks × efficiencies, next to what was measured."""
    t_mem = cost["bytes"] / (bw_gbs * 1e9 * target.bw_efficiency) * 1e3 if bw_gbs else None
    t_compute = cost["flops"] / (peak_tflops * 1e12 * target.compute_efficiency) * 1e3 if peak_tflops else None
    known = [t for t in (t_mem, t_compute) if t is not None]
    est = max(known) if known else None
    bound = None if est is None else ("memory" if est == t_mem else "compute")
    per_token = cost["tokens"] * cost["batch"]
    return {
        "label": LABEL,
        **cost,
        "bytes_per_token": cost["bytes"] / per_token,
        "flops_per_token": cost["flops"] / per_token,
        "intensity_flop_per_byte": cost["flops"] / cost["bytes"],
        "t_mem_est_ms": t_mem,
        "t_compute_est_ms": t_compute,
        "bound_est": bound,
        "est_ms": est,
        "measured_ms": measured_ms,
        "pct_of_roofline": 100 * est / measured_ms if est and measured_ms else None,
    }


def peak_for(target, dtype: str) -> tuple[float | None, str]:
    """The target's dense peak in the artifact's compute dtype (an fp32 artifact on a GPU target runs at
    the fp32 peak, not the tensor-core fp16 one); the profile's own dtype when that one is unknown."""
    by_dtype = {"float32": target.peak_tflops_fp32, "float16": target.peak_tflops_fp16,
                "bfloat16": target.peak_tflops_fp16}
    if by_dtype.get(dtype) is not None:
        return by_dtype[dtype], dtype
    return target.peak_tflops, target.dtype


def shape_estimates(shape, cost: GraphCost, bw, peak, target, measured=(None, None)) -> dict:
    """A test's prefill (its prompt after its depth) and decode (at the mean past over its steps)
    estimates, each next to the measured TTFT / mean ITL when given."""
    out = {}
    if shape.n_prompt:
        out["prefill"] = estimate(cost.step(shape.n_prompt, shape.n_depth, shape.batch), bw, peak, target, measured[0])
    if shape.decode_steps:
        mean_past = shape.n_depth + shape.n_prompt + (shape.decode_steps - 1) / 2
        out["decode"] = estimate(cost.step(1, mean_past, shape.batch), bw, peak, target, measured[1])
    return out
