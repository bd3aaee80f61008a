"""Monarch and BLAST on the PyTorch side: the modules compute kernels/reference.py, the projections are what
they claim (exact where the weight has the structure, blockwise-optimal for Monarch, never worse than their
start for BLAST, better on the calibration inputs when whitened), and the equal-parameter arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecompress.attribution.structured import BlastLinear, MonarchLinear, project_blast, project_monarch
from edgecompress.kernels import reference
from edgecompress.plan import low_rank_rank
from edgecompress.structures import BLAST, LOWRANK, MONARCH

torch.set_num_threads(1)


def _random(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("lead", [(5,), (2, 3), (0, 4)])
def test_modules_compute_the_reference(lead):
    rng = np.random.default_rng(0)
    b, p, q, s, r = 3, 4, 5, 2, 3
    x = _random(rng, *lead, b * p)
    w1, w2, bias = _random(rng, b, p, b * s), _random(rng, b, b * s, q), _random(rng, b * q)
    u, sv, v = _random(rng, b, r, q), _random(rng, b, b, r), _random(rng, b, p, r)
    monarch = MonarchLinear(torch.from_numpy(w1), torch.from_numpy(w2), torch.from_numpy(bias))
    blast = BlastLinear(torch.from_numpy(u), torch.from_numpy(sv), torch.from_numpy(v))
    with torch.no_grad():
        got_monarch = monarch(torch.from_numpy(x)).numpy()
        got_blast = blast(torch.from_numpy(x)).numpy()
    assert got_monarch.shape == (*lead, b * q)
    np.testing.assert_allclose(got_monarch, reference.monarch_matmul(x, w1, w2, bias), atol=1e-5)
    np.testing.assert_allclose(got_blast, reference.blast_matmul(x, u, sv, v), atol=1e-5)


def test_monarch_projection_reproduces_a_monarch_weight_and_is_blockwise_optimal():
    rng = np.random.default_rng(1)
    b, p, q, s = 4, 6, 5, 2
    w1, w2 = _random(rng, b, p, b * s), _random(rng, b, b * s, q)
    exact = reference.dense_weight("MonarchMatMul", w1, w2)
    got = reference.dense_weight("MonarchMatMul", *(f.numpy() for f in project_monarch(torch.from_numpy(exact), b, b * s)))
    np.testing.assert_allclose(got, exact, atol=1e-4)

    dense = rng.standard_normal((b * p, b * q))
    approx = reference.dense_weight("MonarchMatMul", *(f.numpy() for f in project_monarch(torch.from_numpy(dense), b, b * s)))
    # Optimal: every (input l, output k) block pair keeps exactly its top-s singular values.
    blocks = dense.reshape(b, p, b, q).transpose(0, 2, 1, 3)
    discarded = sum((np.linalg.svd(blocks[l, k], compute_uv=False)[s:] ** 2).sum() for l in range(b) for k in range(b))
    assert np.linalg.norm(approx - dense) ** 2 == pytest.approx(discarded, rel=1e-5)


def test_blast_projection_improves_on_its_start_and_recovers_a_blast_weight():
    rng = np.random.default_rng(2)
    b, p, q, r = 4, 6, 5, 3
    dense = rng.standard_normal((b * p, b * q))
    approx = reference.dense_weight("BlastMatMul", *(f.numpy() for f in project_blast(torch.from_numpy(dense), b, r)))
    sigma = np.linalg.svd(dense, compute_uv=False)
    start = np.sqrt((sigma[r:] ** 2).sum())  # the truncated SVD with S = 1, where ALS starts
    assert np.linalg.norm(approx - dense) < 0.97 * start

    u, sv, v = _random(rng, b, r, q), _random(rng, b, b, r), _random(rng, b, p, r)
    exact = reference.dense_weight("BlastMatMul", u, sv, v)
    got = reference.dense_weight("BlastMatMul", *(f.numpy() for f in project_blast(torch.from_numpy(exact), b, r,
                                                                                   iterations=200)))
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.02


@pytest.mark.parametrize("structure", ["monarch", "blast"])
def test_whitened_projection_has_the_smaller_error_on_the_calibration_inputs(structure):
    rng = np.random.default_rng(3)
    b, k, n = 4, 16, 12
    x = rng.standard_normal((400, k)) * np.exp(rng.uniform(-2, 2, k))  # unequal input scales: whitening matters
    gram = torch.from_numpy(x.T @ x)
    dense = torch.from_numpy(rng.standard_normal((k, n)))
    project = project_monarch if structure == "monarch" else project_blast
    op = "MonarchMatMul" if structure == "monarch" else "BlastMatMul"
    size = 4 if structure == "monarch" else 2

    def output_error(factors):
        return np.linalg.norm(x @ (reference.dense_weight(op, *(f.numpy() for f in factors)) - dense.numpy()))

    assert output_error(project(dense, b, size, gram)) < 0.8 * output_error(project(dense, b, size))


def test_equal_parameter_counts_on_smollm2_shapes():
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in): q, k, gate, down
    ranks = [low_rank_rank(m, n, 0.9) for m, n in shapes]
    assert ranks == [28, 14, 41, 41]
    assert [MONARCH.rank_for(m, n, r, 4) for (m, n), r in zip(shapes, ranks)] == [28, 12, 40, 40]
    assert [BLAST.rank_for(m, n, r, 4) for (m, n), r in zip(shapes, ranks)] == [27, 13, 40, 40]
    for (m, n), r in zip(shapes, ranks):
        low_rank = LOWRANK.params(m, n, r, None)
        assert low_rank == r * (m + n) and MONARCH.params(m, n, 8, 4) == 8 * (m + n)
        blast = BLAST.params(m, n, BLAST.rank_for(m, n, r, 4), 4)
        assert low_rank - (m + n + 16) < blast <= low_rank  # within one BLAST rank step, never above


def test_whitened_blast_never_does_worse_than_svd_llm_at_its_rank():
    """It starts from SVD-LLM's whitened truncated SVD (the low-rank optimum on the calibration inputs) and
    every sweep is an exact block minimiser, so it ends at or below that error (here clearly below)."""
    rng = np.random.default_rng(4)
    b, k, n, r = 4, 16, 12, 3
    x = rng.standard_normal((300, k)) @ rng.standard_normal((k, k))  # correlated inputs: a full Gram
    gram = x.T @ x
    dense = rng.standard_normal((k, n))
    lower = np.linalg.cholesky(gram)
    u, sigma, vt = np.linalg.svd(lower.T @ dense)
    svd_llm = np.linalg.solve(lower.T, (u[:, :r] * sigma[:r]) @ vt[:r])
    factors = project_blast(torch.from_numpy(dense), b, r, torch.from_numpy(gram))
    blast = reference.dense_weight("BlastMatMul", *(f.numpy() for f in factors))
    assert np.linalg.norm(x @ (blast - dense)) < 0.97 * np.linalg.norm(x @ (svd_llm - dense))

