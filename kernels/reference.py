"""NumPy reference of the custom ops in the `ai.edgecompress` domain: the one definition of what they compute.

Every implementation is checked against these functions: the C++ CPU kernels, the Triton kernels
(under the interpreter and on a GPU), the lowered standard-ONNX form (LowerCustomOpsPass) and the
PyTorch modules the structured layers become. docs/custom-ops.md documents the same facts for people.

Shapes (X has any leading dims; n = their product; K = in features, N = out features):
- LowRankMatMul(X, A, B[, bias]):  A [K, R], B [R, N]; Y = (X·A)·B + bias.
- MonarchMatMul(X, W1, W2[, bias]): b blocks, K = b·p, N = b·q, R = b·s channels per input block;
  W1 [b, p, R], W2 [b, R, q]. Input block l makes R channels Z[l] = X_l·W1[l]; channel c = k·s + t of
  input block l goes to output block k at position l·s + t (the stride permutation); Y_k = Zp[k]·W2[k].
  Every (output k, input l) block pair of the dense weight has rank s; parameters R·(K + N).
- BlastMatMul(X, U, S, V[, bias]): b blocks, K = b·p, N = b·q, rank r; V [b, p, r], S [b, b, r]
  (S[l, k] couples input block l to output block k), U [b, r, q]:
  Y_k = Σ_l ((X_l·V[l]) ⊙ S[l, k])·U[k]. Parameters r·(K + N) + b²·r.

Precision: products accumulate in float32 (float64 here); the intermediate that the op would store
(LowRank's X·A, Monarch's Zp, BLAST's Σ_l) is rounded to the input dtype before the second product,
exactly as the lowered two-product graph stores it, so fp16 references match what every path stores.
"""

from __future__ import annotations

import numpy as np

DOMAIN = "ai.edgecompress"
DOMAIN_VERSION = 1
OPS = ("LowRankMatMul", "MonarchMatMul", "BlastMatMul")


class ShapeError(ValueError):
    """Inputs whose shapes do not fit the op (the message names the op and the problem)."""


def _rounded(value: np.ndarray, dtype) -> np.ndarray:
    """Round an intermediate to the op's storage dtype (float16 stays float16-representable)."""
    return value.astype(dtype).astype(np.float64)


def _finish(y: np.ndarray, bias, lead: tuple[int, ...], dtype) -> np.ndarray:
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    return y.reshape(*lead, y.shape[-1]).astype(dtype)


def _rows(x: np.ndarray, op: str, k: int) -> tuple[np.ndarray, tuple[int, ...]]:
    if x.ndim < 1 or x.shape[-1] != k:
        raise ShapeError(f"{op}: X's last dimension {x.shape[-1:] or '()'} does not match the weight's {k} inputs")
    return x.reshape(-1, k).astype(np.float64), x.shape[:-1]


def _check_bias(op: str, bias, n: int) -> None:
    if bias is not None and np.shape(bias) != (n,):
        raise ShapeError(f"{op}: bias has shape {np.shape(bias)}, expected ({n},)")


def low_rank_matmul(x: np.ndarray, a: np.ndarray, b: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ShapeError(f"LowRankMatMul: A {a.shape} and B {b.shape} must be [K, R] and [R, N]")
    _check_bias("LowRankMatMul", bias, b.shape[1])
    rows, lead = _rows(x, "LowRankMatMul", a.shape[0])
    t = _rounded(rows @ a.astype(np.float64), x.dtype)
    return _finish(t @ b.astype(np.float64), bias, lead, x.dtype)


def monarch_shapes(w1_shape, w2_shape) -> tuple[int, int, int, int]:
    """(b, p, R, q) of Monarch factors, checked; raises ShapeError naming the problem."""
    if len(w1_shape) != 3 or len(w2_shape) != 3:
        raise ShapeError(f"MonarchMatMul: W1 {tuple(w1_shape)} and W2 {tuple(w2_shape)} must be [b, p, R] and [b, R, q]")
    b, p, r = w1_shape
    if tuple(w2_shape[:2]) != (b, r):
        raise ShapeError(f"MonarchMatMul: W2 {tuple(w2_shape)} must be [{b}, {r}, q] to follow W1 {tuple(w1_shape)}")
    if r % b:
        raise ShapeError(f"MonarchMatMul: R={r} channels per block must be a multiple of the {b} blocks")
    return b, p, r, w2_shape[2]


def monarch_matmul(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    b, p, r, q = monarch_shapes(w1.shape, w2.shape)
    _check_bias("MonarchMatMul", bias, b * q)
    rows, lead = _rows(x, "MonarchMatMul", b * p)
    s = r // b
    z = np.einsum("nlp,lpc->nlc", rows.reshape(-1, b, p), w1.astype(np.float64))  # [n, l, k·s + t]
    zp = z.reshape(-1, b, b, s).transpose(0, 2, 1, 3).reshape(-1, b, r)  # [n, k, l·s + t]
    zp = _rounded(zp, x.dtype)
    y = np.einsum("nkc,kcq->nkq", zp, w2.astype(np.float64)).reshape(-1, b * q)
    return _finish(y, bias, lead, x.dtype)


def blast_shapes(u_shape, s_shape, v_shape) -> tuple[int, int, int, int]:
    """(b, p, r, q) of BLAST factors, checked."""
    if len(u_shape) != 3 or len(s_shape) != 3 or len(v_shape) != 3:
        raise ShapeError(
            f"BlastMatMul: U {tuple(u_shape)}, S {tuple(s_shape)}, V {tuple(v_shape)} must be [b, r, q], [b, b, r], [b, p, r]"
        )
    b, p, r = v_shape
    if tuple(s_shape) != (b, b, r) or tuple(u_shape[:2]) != (b, r):
        raise ShapeError(
            f"BlastMatMul: with V {tuple(v_shape)}, S must be [{b}, {b}, {r}] and U [{b}, {r}, q];"
            f" got S {tuple(s_shape)}, U {tuple(u_shape)}"
        )
    return b, p, r, u_shape[2]


def blast_matmul(x: np.ndarray, u: np.ndarray, s: np.ndarray, v: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    b, p, r, q = blast_shapes(u.shape, s.shape, v.shape)
    _check_bias("BlastMatMul", bias, b * q)
    rows, lead = _rows(x, "BlastMatMul", b * p)
    y_blocks = np.einsum("nlp,lpr->nlr", rows.reshape(-1, b, p), v.astype(np.float64))
    z = _rounded(np.einsum("nlr,lkr->nkr", y_blocks, s.astype(np.float64)), x.dtype)
    y = np.einsum("nkr,krq->nkq", z, u.astype(np.float64)).reshape(-1, b * q)
    return _finish(y, bias, lead, x.dtype)


def dense_weight(op: str, *factors: np.ndarray) -> np.ndarray:
    """The [K, N] matrix an op's factors multiply X by (float64), for projections and tests."""
    if op == "LowRankMatMul":
        a, b = factors
        return a.astype(np.float64) @ b.astype(np.float64)
    if op == "MonarchMatMul":
        w1, w2 = factors
        b, p, _, q = monarch_shapes(w1.shape, w2.shape)
        eye = np.eye(b * p, dtype=np.float64)
        return monarch_matmul(eye, w1.astype(np.float64), w2.astype(np.float64))
    if op == "BlastMatMul":
        u, s, v = factors
        b, p, _, _ = blast_shapes(u.shape, s.shape, v.shape)
        eye = np.eye(b * p, dtype=np.float64)
        return blast_matmul(eye, u.astype(np.float64), s.astype(np.float64), v.astype(np.float64))
    raise ShapeError(f"unknown op {op!r}; the domain has {', '.join(OPS)}")


REFERENCES = {"LowRankMatMul": low_rank_matmul, "MonarchMatMul": monarch_matmul, "BlastMatMul": blast_matmul}
# The blocked ops' factor shape checks: (blocks, K per block, rank, N per block) from the factor shapes.
BLOCK_SHAPES = {"MonarchMatMul": monarch_shapes, "BlastMatMul": blast_shapes}
