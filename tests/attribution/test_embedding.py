"""The tied embedding as part of the budget: rank accounting, the weighted factorization, the torch modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecompress.attribution.embedding import (
    FactoredEmbedding,
    factor_embedding,
    hidden_gram,
    install_factored_embedding,
    token_order,
)
from edgecompress.attribution.layer_walker import set_submodule
from edgecompress.errors import EdgeCompressError
from edgecompress.plan import embedding_params, embedding_rank_for_share, embedding_saving

torch.set_num_threads(1)

# SmolLM2-135M: the tied table is 49152 x 576 of 134,515,008 parameters (21 %).
SMOL = dict(vocab=49152, hidden=576, total_params=134_515_008)


def tied_llama(vocab: int = 48, hidden: int = 16, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def calibration_ids(vocab: int = 48, n: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    # Zipf-like: a few tokens are frequent, as in text.
    generator = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(weights, n * length, replacement=True, generator=generator).reshape(n, length)


@pytest.mark.parametrize(("share", "exact", "rank"), [(0.025, 2048, 498), (0.05, 2048, 427), (0.075, 2048, 357),
                                                      (0.05, 1024, 431), (0.05, 4096, 421)])
def test_rank_for_share_on_smollm2(share, exact, rank):
    got = embedding_rank_for_share(SMOL["vocab"], SMOL["hidden"], SMOL["total_params"], share, exact)
    assert got == rank
    saved = embedding_saving(SMOL["vocab"], SMOL["hidden"], got, exact)
    # At least the share, and one rank more would fall short of it.
    assert saved >= share * SMOL["total_params"] > embedding_saving(SMOL["vocab"], SMOL["hidden"], got + 1, exact)


def test_params_count_what_the_factored_form_stores():
    v, d, r, k = 49152, 576, 427, 2048
    assert embedding_params(v, d, r, k) == k * d + (v - k) * r + r * d
    assert embedding_saving(v, d, r, k) == v * d - embedding_params(v, d, r, k)


@pytest.mark.parametrize(("share", "exact", "message"), [(0.0, 16, "strictly between"), (1.0, 16, "strictly between"),
                                                         (0.05, 0, "exact tokens"), (0.5, 40000, "out of reach")])
def test_bad_budgets_are_one_line_errors(share, exact, message):
    with pytest.raises(EdgeCompressError, match=message) as error:
        embedding_rank_for_share(SMOL["vocab"], SMOL["hidden"], SMOL["total_params"], share, exact)
    assert "\n" not in str(error.value)


def test_exact_tokens_are_the_most_frequent_ties_by_id():
    counts = np.array([0, 5, 2, 5, 9, 2])
    order = token_order(counts, 3)
    assert order.tolist() == [4, 1, 3, 0, 2, 5]


def test_factors_keep_exact_rows_and_reach_the_share():
    model = tied_llama()
    table = model.model.embed_tokens.weight.detach().clone()
    record, factors = factor_embedding(model, calibration_ids(), 0.02, exact_tokens=8)
    order = factors["model.embed_tokens.order"]
    assert np.array_equal(factors["model.embed_tokens.exact"], table[order[:8]].numpy())  # bitwise
    assert record.saving >= 0.02 * sum(p.numel() for p in model.parameters())
    assert (record.vocab, record.hidden, record.exact_tokens, record.module, record.head) == (
        48, 16, 8, "model.embed_tokens", "lm_head")
    assert record.params_after == embedding_params(48, 16, record.rank, 8)
    assert record.index_bytes == 48 * 8 and factors["model.embed_tokens.order"].dtype == np.int64
    rest = record.scores["rest"]
    assert 0 < rest["weighted_error"] < 1 and record.scores["exact"]["weighted_error"] == 0.0
    assert record.scores["exact"]["calibration_coverage"] + rest["calibration_coverage"] == pytest.approx(1.0)
    assert torch.equal(model.model.embed_tokens.weight, table)  # the model is not changed


def test_full_rank_reproduces_the_table_and_errors_fall_with_rank():
    model = tied_llama()
    table = model.model.embed_tokens.weight.detach()
    errors = []
    for rank in (2, 8, 16):
        record, factors = factor_embedding(model, calibration_ids(), None, exact_tokens=8, rank=rank)
        errors.append(record.scores["rest"]["weighted_error"])
    a, b = factors["model.embed_tokens.a"], factors["model.embed_tokens.b"]
    rest = factors["model.embed_tokens.order"][8:]
    np.testing.assert_allclose(a @ b, table[rest].numpy(), atol=1e-5)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6


def test_precomputed_hidden_statistics_give_the_same_factors():
    model, ids = tied_llama(), calibration_ids()
    gram, count = hidden_gram(model, ids, batch_size=2)
    assert count == ids.numel() and gram.dtype == torch.float64
    _, computed = factor_embedding(model, ids, None, exact_tokens=8, rank=6)
    _, given = factor_embedding(model, ids, None, exact_tokens=8, rank=6, hidden_gram=gram, n_tokens=count)
    for name, array in computed.items():
        np.testing.assert_allclose(given[name], array, rtol=1e-5, atol=1e-6)


def test_installed_embedding_computes_lookup_and_head_from_one_set_of_factors():
    model, ids = tied_llama(), calibration_ids()
    _, factors = factor_embedding(model, ids, None, exact_tokens=8, rank=6)
    originals = install_factored_embedding(model, factors)
    embedding = model.model.embed_tokens
    assert isinstance(embedding, FactoredEmbedding) and model.lm_head.embedding is embedding
    table = embedding.dense_table().detach()
    with torch.no_grad():
        assert torch.equal(embedding(ids), table[ids])
        hidden = model.model(ids).last_hidden_state
        torch.testing.assert_close(model(ids).logits, hidden @ table.t(), atol=1e-5, rtol=0)
    names = [name for name, _ in model.named_parameters()]
    assert {"model.embed_tokens.exact", "model.embed_tokens.a", "model.embed_tokens.b"} <= set(names)
    assert not any(name.startswith("lm_head") for name in names)  # tied: one set, listed once
    for name, original in originals.items():
        set_submodule(model, name, original)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_gradients_reach_every_factor_through_both_uses():
    model, ids = tied_llama(), calibration_ids()
    _, factors = factor_embedding(model, ids, None, exact_tokens=8, rank=6)
    install_factored_embedding(model, factors)
    embedding = model.model.embed_tokens
    model.model.layers.requires_grad_(False)
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (embedding.exact, embedding.a, embedding.b))
    embedding.zero_grad()
    model.lm_head(torch.randn(1, 2, 16)).sum().backward()  # the head alone trains the same tensors
    assert embedding.b.grad is not None and embedding.exact.grad is not None


def test_an_untied_head_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with pytest.raises(EdgeCompressError, match="needs a tied lm_head"):
        factor_embedding(model, calibration_ids(), 0.02, exact_tokens=8)
    with pytest.raises(EdgeCompressError, match="needs a tied lm_head"):
        install_factored_embedding(model, {})
