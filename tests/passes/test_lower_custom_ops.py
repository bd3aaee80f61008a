"""LowerCustomOpsPass: the standard-ONNX graph it writes, and that graph in onnxruntime vs the NumPy reference."""

from __future__ import annotations

import zlib

import numpy as np
import onnx_ir as ir
import pytest

from edgecompress.errors import EdgeCompressError
from edgecompress.kernels import reference
from edgecompress.passes.layer_map import LOW_RANK_FACTOR_KEY
from edgecompress.passes.lower_custom_ops import LowerCustomOpsPass
from tests.passes.custom_op_graphs import one_op_model, random_factors, run

TOLERANCE = {np.float32: 2e-5, np.float16: 1e-2}


def _ops(model: ir.Model) -> list[tuple[str, str]]:
    return [(node.domain, node.op_type) for node in model.graph]


@pytest.mark.parametrize("op", reference.OPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_shape", [(5, None), (2, 3, None), (0, 4, None)], ids=["2d", "3d", "empty-batch"])
def test_lowered_graph_matches_the_reference(op, dtype, bias, x_shape):
    rng = np.random.default_rng(zlib.crc32(repr((op, dtype, bias, x_shape)).encode()))
    factors, k, n = random_factors(op, rng, dtype)
    bias_array = rng.standard_normal(n).astype(dtype) if bias else None
    model = one_op_model(op, factors, ["batch", "seq", k][-len(x_shape):], bias_array, dtype=dtype)
    x = rng.standard_normal((*x_shape[:-1], k)).astype(dtype)

    result = LowerCustomOpsPass()(model)

    assert result.stats.lowered == {op: 1}
    assert all(domain == "" for domain, _ in _ops(model))
    (y,) = run(model, {"X": x})
    expected = reference.REFERENCES[op](x, *factors, bias_array)
    assert y.dtype == dtype and y.shape == expected.shape == (*x_shape[:-1], n)
    scale = max(1.0, float(np.abs(expected.astype(np.float64)).max(initial=0)))
    np.testing.assert_allclose(y.astype(np.float64), expected.astype(np.float64), atol=TOLERANCE[dtype] * scale, rtol=0)


def test_low_rank_becomes_the_marked_matmul_pair_with_its_bias():
    rng = np.random.default_rng(0)
    factors, k, n = random_factors("LowRankMatMul", rng, np.float32)
    model = one_op_model("LowRankMatMul", factors, ["batch", k], rng.standard_normal(n).astype(np.float32))

    LowerCustomOpsPass()(model)

    nodes = list(model.graph)
    assert [(node.op_type, [v.name for v in node.inputs]) for node in nodes] == [
        ("MatMul", ["X", "w0"]),
        ("MatMul", [nodes[0].outputs[0].name, "w1"]),
        ("Add", [nodes[1].outputs[0].name, "w2"]),
    ]
    assert [node.metadata_props.get(LOW_RANK_FACTOR_KEY) for node in nodes] == ["A", "B", None]
    assert all(node.metadata_props["origin"] == "test" for node in nodes)
    assert [v.name for v in model.graph.outputs] == ["Y"] and nodes[-1].outputs[0] is model.graph.outputs[0]
    assert "ai.edgecompress" not in model.graph.opset_imports


def test_monarch_is_blockwise_matmuls_around_the_stride_permutation():
    rng = np.random.default_rng(1)
    factors, k, _ = random_factors("MonarchMatMul", rng, np.float32, k_blocks=(2,))
    model = one_op_model("MonarchMatMul", factors, ["batch", "seq", k])

    LowerCustomOpsPass()(model)

    steps = [(node.op_type, list(node.attributes.get_ints("perm", ()))) for node in model.graph]
    assert steps == [
        ("Reshape", []), ("Transpose", [1, 0, 2]), ("MatMul", []),  # X blocks · W1
        ("Reshape", []), ("Transpose", [2, 1, 0, 3]), ("Reshape", []),  # the stride permutation
        ("MatMul", []), ("Transpose", [1, 0, 2]),  # · W2, back to [n, b, q]
        ("Shape", []), ("Concat", []), ("Reshape", []),  # X's leading dims + [N]
    ]


def test_a_subset_lowers_only_those_and_keeps_the_domain():
    rng = np.random.default_rng(2)
    low_rank_factors = random_factors("LowRankMatMul", rng, np.float32, k_blocks=(2,), extra=(3, 3, 2))[0]
    low_rank = one_op_model("LowRankMatMul", low_rank_factors, ["n", 6])
    monarch_factors = random_factors("MonarchMatMul", rng, np.float32, k_blocks=(2,), extra=(3, 3, 2))[0]
    # Chain LowRank's Y (N = 6) into a Monarch node (K = 6).
    graph = low_rank.graph
    weights = []
    for index, array in enumerate(monarch_factors):
        value = ir.Value(name=f"m{index}", shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.tensor(array, name=f"m{index}"))
        graph.register_initializer(value)
        weights.append(value)
    monarch = ir.node("MonarchMatMul", [graph.outputs[0], *weights], domain="ai.edgecompress", name="monarch")
    graph.append(monarch)
    graph.outputs[0] = monarch.outputs[0]
    monarch.outputs[0].name = "Z"

    result = LowerCustomOpsPass(ops=["MonarchMatMul"])(low_rank)

    assert result.modified and result.stats.lowered == {"MonarchMatMul": 1}
    assert result.stats.kept == {"LowRankMatMul": 1} and not result.stats.domain_import_removed
    assert ("ai.edgecompress", "LowRankMatMul") in _ops(low_rank)
    assert low_rank.graph.opset_imports["ai.edgecompress"] == 1
    assert [v.name for v in low_rank.graph.outputs] == ["Z"]


def test_a_graph_without_the_ops_is_unchanged():
    rng = np.random.default_rng(3)
    model = one_op_model("BlastMatMul", random_factors("BlastMatMul", rng, np.float32)[0], ["n", 6])

    assert not LowerCustomOpsPass(ops=[])(model).modified
    assert _ops(model) == [("ai.edgecompress", "BlastMatMul")]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LowerCustomOpsPass(ops=["DenseMatMul"]), "unknown custom op"),
        (lambda: LowerCustomOpsPass()(one_op_model("LowRankMatMul", [np.ones((4, 2), np.float32)] * 2, ["n", 4],
                                                   opset=14)), "needs ONNX opset 17"),
    ],
)
def test_bad_input_is_a_one_line_user_error(build, message):
    with pytest.raises(EdgeCompressError, match=message) as error:
        build()
    assert "\n" not in str(error.value)


def test_a_weight_without_a_static_shape_is_refused():
    rng = np.random.default_rng(4)
    model = one_op_model("LowRankMatMul", random_factors("LowRankMatMul", rng, np.float32)[0], ["n", 6])
    model.graph.initializers["w1"].shape = ir.Shape(["r", 10])

    with pytest.raises(EdgeCompressError, match="weight B .* no static shape"):
        LowerCustomOpsPass()(model)


def test_an_empty_bias_name_is_no_bias():
    rng = np.random.default_rng(5)
    factors, k, _ = random_factors("MonarchMatMul", rng, np.float32)
    model = one_op_model("MonarchMatMul", factors, ["n", k])
    node = next(iter(model.graph))
    node.resize_inputs(4)  # X, W1, W2, "" (the optional bias left out by name)
    assert len(node.inputs) == 4 and node.inputs[3] is None
    x = rng.standard_normal((3, k)).astype(np.float32)

    LowerCustomOpsPass()(model)

    assert "Add" not in {n.op_type for n in model.graph}
    np.testing.assert_allclose(run(model, {"X": x})[0], reference.monarch_matmul(x, *factors), atol=2e-5)
