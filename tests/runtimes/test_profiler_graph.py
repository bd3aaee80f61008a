"""The profiler's view of the graph, checked against the onnx package: the wire-format reader, roofline
bytes, the trace-to-role mapping on a real onnxruntime trace (low-rank factors included), the
Jetson/NVML text parsers and target predictions."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgecompress.targets import profiles
from edgecompress.runtimes.profiler import fingerprint, memory, roofline
from edgecompress.runtimes.profiler.onnx_graph import LOW_RANK_KEY, read_graph
from edgecompress.runtimes.profiler.ops import classify, load_trace, op_profile, split_runs
from edgecompress.runtimes.profiler.predict import predict
from edgecompress.runtimes.profiler.roles import NodeIndex
from edgecompress.runtimes.profiler.settings import ProfileSettings

LOW_RANK_MODULES = {"model.layers.1.mlp.up_proj": (64, 128), "model.layers.1.self_attn.q_proj": (64, 64)}


@pytest.fixture(scope="module")
def low_rank_int4(tiny_llama_artifact, tmp_path_factory):
    """The tiny artifact's graph with two Linears split by SplitLowRankPass, then int4 MatMulNBits."""
    import onnx_ir as ir

    from edgecompress.passes.quantize_weights import QuantizeWeightsPass
    from edgecompress.passes.split_low_rank import SplitLowRankPass

    folder, _ = tiny_llama_artifact
    rng = np.random.default_rng(0)
    factors = {name: (rng.standard_normal((8, k)).astype(np.float32), rng.standard_normal((n, 8)).astype(np.float32))
               for name, (k, n) in LOW_RANK_MODULES.items()}
    model = ir.load(str(folder / "model.onnx"))
    SplitLowRankPass(factors)(model)
    QuantizeWeightsPass(bits=4, block_size=32, accuracy_level=4)(model)
    out = tmp_path_factory.mktemp("low-rank") / "lr-int4"
    out.mkdir()
    ir.save(model, str(out / "model.onnx"), external_data="model.onnx.data")
    return out


def _initializer_bytes(folder) -> dict[str, int]:
    proto = onnx.load(str(folder / "model.onnx"))
    return {t.name: numpy_helper.to_array(t, base_dir=str(folder)).nbytes for t in proto.graph.initializer}


@pytest.mark.parametrize("which", ["dense", "low_rank_int4"])
def test_the_wire_reader_agrees_with_onnx(which, tiny_llama_artifact, low_rank_int4):
    folder = tiny_llama_artifact[0] if which == "dense" else low_rank_int4
    graph = read_graph(folder / "model.onnx")
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert [(n.name, n.op_type, n.domain, n.inputs, n.outputs) for n in graph.nodes] == [
        (n.name, n.op_type, n.domain, list(n.input), list(n.output)) for n in proto.graph.node]
    assert {name: init.nbytes for name, init in graph.initializers.items()} == _initializer_bytes(folder)
    for value in proto.graph.input:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert graph.inputs[value.name] == (value.type.tensor_type.elem_type, dims)
    marked = {n.name: {p.key: p.value for p in n.metadata_props}.get(LOW_RANK_KEY, "") for n in proto.graph.node}
    assert {n.name: n.low_rank for n in graph.nodes} == marked


def _independent_cost(folder):
    """Weight bytes, embedding row bytes and Σ(K+N), Σ K·N straight from onnx."""
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    sizes = _initializer_bytes(folder)
    dims = {t.name: list(t.dims) for t in proto.graph.initializer}
    uses: dict[str, set] = {}
    for node in proto.graph.node:
        for index, name in enumerate(node.input):
            uses.setdefault(name, set()).add((node.op_type, index))
    gather_only = {name for name in sizes if uses.get(name) == {("Gather", 0)}}
    rows = sum(sizes[name] // dims[name][0] for name in gather_only)
    used = {name for name in sizes if name in uses}
    k_plus_n = kn = 0
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            k, n = attrs["K"], attrs["N"]
        elif node.op_type == "MatMul" and node.input[1] in dims and len(dims[node.input[1]]) == 2:
            k, n = dims[node.input[1]]
        else:
            continue
        k_plus_n, kn = k_plus_n + k + n, kn + k * n
    return sum(sizes[name] for name in used - gather_only), rows, k_plus_n, kn


@pytest.mark.parametrize("which", ["dense", "low_rank_int4"])
def test_roofline_bytes_are_the_graphs_initializer_bytes(which, tiny_llama_artifact, low_rank_int4):
    folder = tiny_llama_artifact[0] if which == "dense" else low_rank_int4
    weights, rows, k_plus_n, kn = _independent_cost(folder)
    layers, kv_heads, heads, head_dim = 3, 2, 4, 16
    cost = roofline.graph_cost(read_graph(folder / "model.onnx"), layers, kv_heads, heads, head_dim, 4)
    assert (cost.weight_bytes, cost.gather_row_bytes) == (weights, rows)
    assert rows == 64 * 4  # one fp32 embedding row of the tied table per token
    step = cost.step(1, 10)
    kv_token = 2 * layers * kv_heads * head_dim * 4
    assert step["bytes"] == weights + rows + kv_token * 10 + kv_token + k_plus_n * 4
    assert step["flops"] == 2 * kn + 4 * layers * heads * head_dim * 11
    if which == "low_rank_int4":  # packed int4 weights and their scales both count
        graph = read_graph(folder / "model.onnx")
        scales = sum(i.nbytes for n, i in graph.initializers.items() if n.endswith("nbits_scales"))
        assert scales > 0 and cost.weight_bytes > scales + sum(
            i.nbytes for n, i in graph.initializers.items() if n.endswith("nbits_b"))


def test_trace_events_map_to_roles_on_a_real_trace(low_rank_int4, tmp_path):
    graph = read_graph(low_rank_int4 / "model.onnx")
    ids = np.arange(1, 9, dtype=np.int64)[None, :]
    section, trace = op_profile(low_rank_int4, graph, ["CPUExecutionProvider"], 1, False, ids, 2, 20.0, tmp_path)
    proto = onnx.load(str(low_rank_int4 / "model.onnx"), load_external_data=False)
    factors = {n.name for n in proto.graph.node if any(p.key == LOW_RANK_KEY for p in n.metadata_props)}
    assert len(factors) == 2 * len(LOW_RANK_MODULES)
    index = NodeIndex(graph)
    runs = split_runs(load_trace(trace))
    assert len(runs) == 2 + 1 + 2  # warm-up prefill and step, then the profiled prefill and two steps
    rows = [classify(event, index) for event in runs[-1][1:]]
    low_rank = {row["name"] for row in rows if row["role"] == "low_rank"}
    assert low_rank == factors  # exactly the SplitLowRankPass MatMuls, nothing else
    by_name = {row["name"]: row for row in rows}
    scopes = {n.name: _scope(n) for n in proto.graph.node}
    for name, scope in scopes.items():
        if name in by_name and name not in factors and scope.endswith(("q_proj", "k_proj", "v_proj")):
            assert by_name[name]["role"] == "attn_proj"
        if name in by_name and scope.endswith(("gate_proj", "up_proj", "down_proj")) and name not in factors:
            assert by_name[name]["role"] == "mlp"
    fused = [row for row in rows if "/" in row["name"]]  # onnxruntime's fusions keep the origin's name
    assert fused and all(index.find(row["name"]) is not None for row in fused)
    decode = section["decode"]
    roles = {row["role"] for row in decode["by_role"]}
    assert {"low_rank", "mlp", "attn_proj", "attn_out", "attn_core", "norm", "lm_head", "embed"} <= roles
    assert sum(row["ms"] for row in decode["by_role"]) == pytest.approx(decode["kernels_ms"])
    assert sum(row["pct"] for row in decode["by_role"]) == pytest.approx(100.0)
    assert decode["runs"] == 2 and section["prefill"]["runs"] == 1 and decode["run_ms"] >= decode["kernels_ms"]
    top = decode["top_nodes"][0]
    assert top["gbs"] == pytest.approx(top["bytes"] / (top["ms"] * 1e6))


def _scope(node) -> str:
    from edgecompress.runtimes.profiler.onnx_graph import SCOPES_KEY, deepest_scope

    return next((deepest_scope(p.value) for p in node.metadata_props if p.key == SCOPES_KEY), "")


TEGRASTATS = ("RAM 1343/7620MB (lfb 157x4MB) SWAP 165/3810MB (cached 3MB) CPU [0%@1497,0%@729] EMC_FREQ 15%@2133 "
              "GR3D_FREQ 7%@[305] NVDEC off APE 200 cpu@48.562C gpu@49.625C VDD_IN 5251mW/8535mW "
              "VDD_CPU_GPU_CV 512mW/1944mW VDD_SOC 2720mW/3659mW")


def test_jetson_text_is_parsed_field_by_field():
    values = memory.parse_tegrastats(TEGRASTATS)
    assert values["ram_used_mb"] == 1343 and values["emc_mhz"] == 2133 and values["gpu_mhz"] == 305
    assert values["power_VDD_IN_mw"] == 5251 and values["power_VDD_SOC_mw"] == 2720
    assert memory.parse_tegrastats("RAM 1/2MB EMC_FREQ 0%")["emc_util_pct"] == 0  # drifted formats
    assert fingerprint.parse_l4t("# R36 (release), REVISION: 4.3, GCID: 38968081") == "36.4.3"
    assert fingerprint.parse_nvpmodel("NV Power Mode: MAXN_SUPER\n2\n") == {"name": "MAXN_SUPER", "id": 2}
    device = {"jetson": {"nvpmodel": {"name": "7W", "id": 1}}}
    assert "differs" in fingerprint.power_mode_warning(device, "15W")
    assert fingerprint.power_mode_warning(device, "7W") is None


def test_live_emc_clock_sets_the_jetson_bandwidth():
    jetson = profiles.load_profile("cpu-x86").__class__  # a TargetProfile with a 128-bit EMC bus
    target = jetson(name="j", description="", device="cuda", execution_provider=("CUDAExecutionProvider",),
                    dtype="float16", memory_bandwidth_gbs=68, emc_bus_bits=128)
    assert roofline.bandwidth(target, {"emc_max_mhz": None}, 3199) == (102.4, "emc_live")
    assert roofline.bandwidth(target, None, 3199) == (68, "profile")  # not on a Jetson: the profile's number


def test_a_prediction_for_another_target_is_labelled(tiny_llama_artifact):
    if "jetson-orin-nano" not in profiles.available():
        pytest.skip("targets/jetson-orin-nano.toml is not there yet")
    settings = ProfileSettings(n_prompt=[8], n_gen=[4], depth=[16])
    jetson = predict(tiny_llama_artifact[0], "jetson-orin", settings)
    cpu = predict(tiny_llama_artifact[0], "cpu-x86", settings)
    assert jetson["target"] == "jetson-orin-nano" and "prediction" in jetson["label"]
    assert jetson["bw_gbs"] == profiles.load_profile("jetson-orin-nano").memory_bandwidth_gbs
    assert jetson["dtype"] == "float32"  # the artifact's compute dtype picks the peak
    decode = {t["test"]: t for t in jetson["tests"]}["tg4 @ d16"]["decode"]
    assert decode["bytes"] == {t["test"]: t for t in cpu["tests"]}["tg4 @ d16"]["decode"]["bytes"]
    assert decode["measured_ms"] is None and decode["est_ms"] > 0


def test_a_tied_lm_head_through_transpose_counts_its_flops_and_the_table_once(tmp_path):
    """smollm2's fp32 export reads the tied table as MatMul(x, Transpose(table)): K·N from the table."""
    from onnx import TensorProto, helper

    table = numpy_helper.from_array(np.zeros((50, 8), np.float32), "embed.weight")
    nodes = [helper.make_node("Gather", ["embed.weight", "ids"], ["h"], name="embed"),
             helper.make_node("Transpose", ["embed.weight"], ["table_t"], name="t"),
             helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="lm_head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 50])], [table])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    cost = roofline.graph_cost(read_graph(tmp_path / "m.onnx"), 1, 1, 1, 8, 4)
    assert (cost.linear_kn, cost.linear_k_plus_n) == (8 * 50, 8 + 50)
    assert (cost.weight_bytes, cost.gather_row_bytes) == (50 * 8 * 4, 0)  # read in full by the lm_head
