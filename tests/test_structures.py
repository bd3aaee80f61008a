"""edgecompress.structures: each structure's facts in one entry, and a new structure is only its entry.

The toy structure below is one entry and nothing else (it reuses Monarch's op, module, projection and
lowering, with another rank rule): a build with it runs through plan, attribution, export, lowering and
verification without any other file knowing its name."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from edgecompress import api, structures
from edgecompress.kernels import reference
from edgecompress.plan import low_rank_rank
from edgecompress.structures import BLAST, LOWRANK, MONARCH, STRUCTURES


def test_every_entry_matches_its_kernel_and_homes():
    assert set(structures.BY_OP) == set(reference.OPS)  # one structure per op of the library
    for entry in STRUCTURES.values():
        assert callable(entry.lower())
        if entry.blocked:
            assert entry.op in reference.BLOCK_SHAPES and callable(entry.project())
            assert entry.torch_class().__name__.endswith("Linear")
        # the factor shapes are what the NumPy reference accepts, and the parameters are their sizes
        m, n, b = 24, 16, 4 if entry.blocked else None
        rank = entry.rank_for(m, n, 8, b)
        shapes = entry.factor_shapes(m, n, rank, b)
        if entry.blocked:
            blocks, per_in, _, per_out = reference.BLOCK_SHAPES[entry.op](*shapes)
            assert (blocks * per_in, blocks * per_out) == (n, m)
        assert entry.params(m, n, rank, b) == sum(math.prod(shape) for shape in shapes)
    assert LOWRANK.initializer_names("m.q") == ("m.q.lowrankmatmul_a", "m.q.lowrankmatmul_b")
    assert MONARCH.projection_name(whitened=True) == "blockwise SVD (block-whitened)"
    assert BLAST.params(24, 16, 3, 4) == 3 * (24 + 16) + 16 * 3


def test_an_unknown_structure_is_one_clear_error():
    with pytest.raises(Exception, match="unknown structure 'diagonal'; use one of lowrank, monarch, blast"):
        structures.get("diagonal")


def _half_monarch_rank(out_features, in_features, rank, blocks):
    """The toy's own rule: half of Monarch's channels, still a multiple of the blocks."""
    return max(blocks, MONARCH.rank_for(out_features, in_features, rank, blocks) // (2 * blocks) * blocks)


def test_a_new_structure_is_one_entry(tiny_llama_dir, calibration_file, tmp_path, monkeypatch):
    toy = dataclasses.replace(MONARCH, name="toy", rank_rule=_half_monarch_rank, summary="half-rank Monarch")
    monkeypatch.setitem(STRUCTURES, "toy", toy)
    out = tmp_path / "toy"
    report = api.build(str(tiny_llama_dir), "cpu-x86", out, ratio=0.1, method="grasp-w", structure="toy",
                       calibration=calibration_file, eval_limit=0, calib_sequences=2, calib_seq_len=16)
    assert report["verification"]["passed"]
    plan = json.loads((out / "plan" / "plan.json").read_text())
    linears = [lin for layer in plan["layers"] if layer["action"] == "replace" for lin in layer["linears"]]
    assert linears and {lin["structure"] for lin in linears} == {"toy"}
    for lin in linears:  # the toy's rank rule decided each rank, and its shapes the parameter count
        m, n = lin["out_features"], lin["in_features"]
        assert lin["rank"] == _half_monarch_rank(m, n, low_rank_rank(m, n, plan["settings"]["rho"]), lin["blocks"])
        assert lin["params"] == toy.params(lin["out_features"], lin["in_features"], lin["rank"], lin["blocks"])
    assert report["export"]["passes"]["ReplaceLayersPass"]["structured"] == {"MonarchMatMul": len(linears)}
