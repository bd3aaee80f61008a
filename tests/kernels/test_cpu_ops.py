"""The library's CPU kernels in onnxruntime against kernels/reference.py: every op, fp32 and fp16,
odd and degenerate shapes, and the errors of bad inputs (the op's name, then the problem)."""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgecompress.kernels import reference
from tests.kernels.ops_library import one_op_model, run, session

EPS32 = np.finfo(np.float32).eps
EPS16 = 2.0**-10  # fp16 machine epsilon

# (lead dims of X, sizes): LowRank (K, R, N); Monarch (b, p, R, q); BLAST (b, p, r, q).
LOW_RANK = [
    ((2, 5), (37, 9, 23)),
    ((1,), (16, 1, 5)),
    ((3,), (8, 12, 10)),
    ((1, 1), (64, 16, 48)),
    ((0, 4), (12, 3, 7)),
    ((7,), (300, 20, 40)),
    ((130,), (40, 6, 19)),
    ((2,), (70, 72, 150)),  # 1-2 rows: the 64-column decode tiles, then 16-wide and ragged ones
]
MONARCH = [
    ((2, 3), (4, 6, 8, 5)),
    ((1,), (2, 3, 2, 7)),
    ((5,), (3, 2, 9, 4)),
    ((0,), (3, 2, 3, 2)),
    ((129,), (4, 8, 16, 4)),
    ((1, 1), (1, 7, 5, 3)),
    ((1,), (2, 5, 4, 70)),
]
BLAST = [
    ((2, 3), (4, 6, 3, 5)),
    ((1,), (1, 5, 1, 3)),
    ((4,), (2, 3, 7, 4)),
    ((0, 2), (2, 3, 2, 4)),
    ((140,), (3, 10, 12, 7)),
]


def factors(op: str, sizes, dtype, rng):
    """Random X-independent inputs of `op` (weights), and K and N."""

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1)).astype(dtype)

    if op == "LowRankMatMul":
        k, r, n = sizes
        return [w(k, r), w(r, n)], k, n
    if op == "MonarchMatMul":
        b, p, r, q = sizes
        return [w(b, p, r), w(b, r, q)], b * p, b * q
    b, p, r, q = sizes
    return [w(b, r, q), rng.standard_normal((b, b, r)).astype(dtype), w(b, p, r)], b * p, b * q


def cases():
    for op, table in (("LowRankMatMul", LOW_RANK), ("MonarchMatMul", MONARCH), ("BlastMatMul", BLAST)):
        for lead, sizes in table:
            for dtype in (np.float32, np.float16):
                for bias in (True, False):
                    yield pytest.param(
                        op,
                        lead,
                        sizes,
                        dtype,
                        bias,
                        id=f"{op}-{lead}-{sizes}-{np.dtype(dtype).name}-{'bias' if bias else 'nobias'}",
                    )


def magnitude_bound(op: str, x, weights, bias) -> np.ndarray:
    """The op applied to absolute values (float64): bounds every partial sum, so rounding errors scale with it."""
    absolute = [np.abs(a.astype(np.float64)) for a in (x, *weights)]
    out = reference.REFERENCES[op](*absolute)
    return out + (np.abs(bias.astype(np.float64)) if bias is not None else 0.0)


@pytest.mark.parametrize(("op", "lead", "sizes", "dtype", "bias"), list(cases()))
def test_cpu_kernel_matches_the_reference(op, lead, sizes, dtype, bias):
    rng = np.random.default_rng(zlib.crc32(repr((op, lead, sizes)).encode()))
    weights, k, n = factors(op, sizes, dtype, rng)
    x = rng.standard_normal((*lead, k)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype) if bias else None
    y = run(op, x, *weights, *([b] if bias else []))
    assert y.dtype == dtype and y.shape == (*lead, n)
    bound = magnitude_bound(op, x, weights, b)
    depth = k + max(sizes)  # summands along both products (and BLAST's b-term mixing) bound the error growth
    if dtype == np.float32:
        # fp32 accumulation vs float64 on the same inputs: the standard gamma_n = n·eps bound.
        expected = reference.REFERENCES[op](*(a.astype(np.float64) for a in (x, *weights)), b)
        tolerance = depth * EPS32 * bound + 1e-30
    else:
        # The reference rounds the intermediate and Y to fp16 too; our fp32 partial sums may round the
        # intermediate to the neighbouring fp16 value (one fp16 eps, relative), which reaches Y scaled by at
        # most the bound, and Y's own rounding is half an fp16 eps of |Y| <= bound.
        expected = reference.REFERENCES[op](x, *weights, b).astype(np.float64)
        tolerance = 2 * EPS16 * bound + 1e-6
    error = np.abs(y.astype(np.float64) - expected)
    assert np.all(error <= tolerance), f"max error {error.max():.3g}, worst tolerance {np.min(tolerance - error):.3g}"


def test_fp16_model_runs_the_fp16_kernel_not_a_cast_wrapped_fp32_one(tmp_path):
    """onnxruntime wraps an fp32-only kernel in Casts for fp16 inputs; ours must run on fp16 itself: the
    optimized graph keeps one node and no Cast, and Y agrees bit for bit with the fp16-rounded reference
    (an fp32 kernel between Casts would skip the intermediate's fp16 rounding)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 96)).astype(np.float16)
    a = (rng.standard_normal((96, 32)) / 10).astype(np.float16)
    b = (rng.standard_normal((32, 80)) / 6).astype(np.float16)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    y = session(one_op_model("LowRankMatMul", [np.float16] * 3), options).run(None, {"i0": x, "i1": a, "i2": b})[0]
    nodes = [node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node]
    assert nodes == ["LowRankMatMul"]
    exact = np.mean(y == reference.low_rank_matmul(x, a, b))
    unrounded = (x.astype(np.float64) @ a.astype(np.float64) @ b.astype(np.float64)).astype(np.float16)
    assert exact >= 0.99 and np.mean(y == unrounded) < exact


def test_bias_given_as_an_empty_name_is_no_bias():
    rng = np.random.default_rng(4)
    x, a, b = (rng.standard_normal(s).astype(np.float32) for s in ((3, 8), (8, 2), (2, 5)))
    y = run("LowRankMatMul", x, a, b, node_inputs=["i0", "i1", "i2", ""])
    np.testing.assert_allclose(y, reference.low_rank_matmul(x, a, b), rtol=1e-5, atol=1e-6)


def _f32(*shape):
    return np.ones(shape, np.float32)


BAD_INPUTS = [
    ("LowRankMatMul", [_f32(3, 8), _f32(8, 2, 1), _f32(2, 5)], "LowRankMatMul: A (8, 2, 1) must have rank 2"),
    (
        "LowRankMatMul",
        [_f32(3, 8), _f32(8, 2), _f32(3, 5)],
        "LowRankMatMul: A (8, 2) and B (3, 5) must be [K, R] and [R, N]",
    ),
    (
        "LowRankMatMul",
        [_f32(3, 7), _f32(8, 2), _f32(2, 5)],
        "LowRankMatMul: X's last dimension (7,) does not match the weight's 8 inputs",
    ),
    (
        "LowRankMatMul",
        [_f32(3, 8), _f32(8, 2), _f32(2, 5), _f32(4)],
        "LowRankMatMul: bias has shape (4,), expected (5,)",
    ),
    (
        "LowRankMatMul",
        [_f32(3, 8), _f32(8, 2).astype(np.float16), _f32(2, 5)],
        "LowRankMatMul: mixed dtypes: X is float32 but A is float16",
    ),
    ("LowRankMatMul", [_f32(3, 8), _f32(8, 2)], "LowRankMatMul: expected 3 or 4 inputs (X, A, B[, bias]), got 2"),
    (
        "LowRankMatMul",
        [_f32(3, 8).astype(np.float64), _f32(8, 2).astype(np.float64), _f32(2, 5).astype(np.float64)],
        "LowRankMatMul: X is float64; this execution provider runs float32, float16",
    ),
    (
        "MonarchMatMul",
        [_f32(3, 8), _f32(2, 4, 3), _f32(2, 3, 5)],
        "MonarchMatMul: R=3 channels per block must be a multiple of the 2 blocks",
    ),
    (
        "MonarchMatMul",
        [_f32(3, 8), _f32(2, 4, 4), _f32(3, 4, 5)],
        "MonarchMatMul: W2 (3, 4, 5) must be [2, 4, q] to follow W1 (2, 4, 4)",
    ),
    ("MonarchMatMul", [_f32(3, 8), _f32(8, 4), _f32(2, 4, 5)], "MonarchMatMul: W1 (8, 4) must have rank 3"),
    (
        "BlastMatMul",
        [_f32(3, 8), _f32(2, 3, 5), _f32(2, 3, 3), _f32(2, 4, 3)],
        "BlastMatMul: with V (2, 4, 3), S must be [2, 2, 3] and U [2, 3, q]; got S (2, 3, 3), U (2, 3, 5)",
    ),
    (
        "BlastMatMul",
        [_f32(3, 8), _f32(2, 3, 5), _f32(2, 2, 3)],
        "BlastMatMul: expected 4 or 5 inputs (X, U, S, V[, bias]), got 3",
    ),
]


@pytest.mark.parametrize(
    ("op", "arrays", "message"), BAD_INPUTS, ids=[m.split(": ", 1)[1][:40] for _, _, m in BAD_INPUTS]
)
def test_bad_inputs_are_invalid_argument_errors_naming_the_op(op, arrays, message):
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument) as caught:
        run(op, *arrays)
    assert str(caught.value).split("Status Message: ", 1)[1].startswith(message)


def test_too_many_inputs_are_refused_when_the_session_is_made():
    """onnxruntime's schema check (not the kernel) refuses a fifth LowRank input; it names the op."""
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidGraph, match=r"LowRankMatMul.*input size 5"):
        session(one_op_model("LowRankMatMul", [np.float32] * 5))
