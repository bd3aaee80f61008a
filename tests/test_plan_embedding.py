"""A plan with a factored tied embedding: plan.json round trip, old plans, validation, apply_plan, the plan
stage's passes, and a --plan int4 build end to end on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgecompress.attribution.embedding import FactoredEmbedding, factor_embedding
from edgecompress.errors import EdgeCompressError
from edgecompress.plan import CompressionPlan, EmbeddingPlan, LayerPlan, model_weights_hash

torch.set_num_threads(1)


def embedding_plan(model, exact_tokens: int = 8, rank: int = 6) -> CompressionPlan:
    """Every decoder layer kept, the tied table factored; parameters counted as make_plan counts them."""
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    record, factors = factor_embedding(model, ids, None, exact_tokens=exact_tokens, rank=rank)
    total = sum(p.numel() for p in model.parameters())
    n_layers = model.config.num_hidden_layers
    return CompressionPlan(
        method="grasp", settings={"embedding_exact_tokens": exact_tokens, "embedding_rank": rank},
        layers=[LayerPlan(i, f"model.layers.{i}", "keep") for i in range(n_layers)], scores={},
        params={"dense_total": total, "removed": record.saving, "after": total - record.saving,
                "achieved_ratio": record.saving / total, "target_ratio": None, "counts_embeddings": True},
        model_hash=model_weights_hash(model), calibration={"hash": "0" * 64},
        model={"architecture": type(model).__name__, "num_hidden_layers": n_layers, "layer_prefix": "model.layers"},
        embedding=record, factors=factors,
    )


@pytest.fixture
def tied_model():
    from tests.tiny_models import make_model

    return make_model("llama", layers=2, vocab_size=48, hidden=32)


def test_round_trip_keeps_the_entry_and_its_factors(tied_model, tmp_path):
    plan = embedding_plan(tied_model)
    plan.save(tmp_path)

    loaded = CompressionPlan.load(tmp_path)

    assert isinstance(loaded.embedding, EmbeddingPlan) and loaded.embedding == plan.embedding
    assert loaded.to_json_dict() == plan.to_json_dict()
    for name in ("exact", "a", "b", "order"):
        key = f"model.embed_tokens.{name}"
        assert loaded.factors[key].dtype == plan.factors[key].dtype and np.array_equal(loaded.factors[key],
                                                                                        plan.factors[key])
    assert json.loads((tmp_path / "plan.json").read_text())["embedding"]["rank"] == 6


def test_a_plan_written_before_embeddings_still_loads(tied_model, tmp_path):
    plan = embedding_plan(tied_model)
    plan.embedding = None
    plan.factors = {}
    plan.save(tmp_path)
    data = json.loads((tmp_path / "plan.json").read_text())
    del data["embedding"]  # as an older version wrote it
    (tmp_path / "plan.json").write_text(json.dumps(data))

    assert CompressionPlan.load(tmp_path).embedding is None


@pytest.mark.parametrize(("edit", "message"), [
    (lambda plan: setattr(plan.embedding, "params_after", 1), "parameter counts disagree"),
    (lambda plan: plan.factors.pop("model.embed_tokens.b"), "miss model.embed_tokens.b"),
    (lambda plan: plan.factors.update({"model.embed_tokens.a": np.zeros((3, 6), np.float32)}), "wrong shape"),
    (lambda plan: plan.factors.update({"model.embed_tokens.order": np.zeros(48, np.int64)}), "not a permutation"),
    (lambda plan: setattr(plan.embedding, "rank", 0), "does not fit"),
])
def test_validate_refuses_an_inconsistent_entry(tied_model, edit, message):
    plan = embedding_plan(tied_model)
    edit(plan)
    with pytest.raises(EdgeCompressError, match=message):
        plan.validate()


def test_apply_plan_installs_one_factored_table(tied_model):
    from edgecompress.apply_plan import apply_plan

    plan = embedding_plan(tied_model)
    apply_plan(tied_model, plan)

    embedding = tied_model.model.embed_tokens
    assert isinstance(embedding, FactoredEmbedding) and tied_model.lm_head.embedding is embedding
    order = plan.factors["model.embed_tokens.order"]
    assert torch.equal(embedding.order, torch.as_tensor(order))


def test_apply_plan_refuses_another_table_shape(tied_model):
    from edgecompress.apply_plan import apply_plan
    from tests.tiny_models import make_model

    plan = embedding_plan(make_model("llama", layers=2, vocab_size=64, hidden=32))
    with pytest.raises(EdgeCompressError, match="does not match"):
        apply_plan(tied_model, plan, check_hash=False)


def test_plan_stage_factors_the_embedding_after_the_layers(tied_model):
    from edgecompress import graph_stages

    names = [type(p).__name__ for _, p in graph_stages.plan_passes(embedding_plan(tied_model))]
    assert names == ["ReplaceLayersPass", "FactorEmbeddingPass", "LowerCustomOpsPass"]
    plan = embedding_plan(tied_model)
    plan.embedding = None
    assert "FactorEmbeddingPass" not in [type(p).__name__ for _, p in graph_stages.plan_passes(plan)]


def test_int4_build_from_a_saved_plan(tiny_llama_dir, tmp_path):
    """--plan reuse end to end: the factored export verified against PyTorch with the plan, then int4."""
    from edgecompress import api, models

    loaded = models.load(models.resolve(str(tiny_llama_dir)))
    embedding_plan(loaded.model, exact_tokens=8, rank=16).save(tmp_path / "plan")

    report = api.build(str(tiny_llama_dir), "cpu-x86", tmp_path / "out", plan=tmp_path / "plan", weights="int4")

    assert report["verification"]["passed"]
    factored = report["export"]["passes"]["FactorEmbeddingPass"]
    assert factored["modified"] and factored["exact_tokens"] == 8 and factored["rank"] == 16
    quantized = report["export"]["optimize"]["weights"]["QuantizeWeightsPass"]
    assert quantized["skipped"] == {"kept float: factored embedding lookup": 1}
    assert CompressionPlan.load(tmp_path / "out" / "plan").embedding.rank == 16
