"""Layer scores from hooks against a manual computation on a tiny random Llama."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgecompress.attribution.block_influence import block_influence, layer_scores
from edgecompress.attribution.layer_walker import LayerWalker

torch.set_num_threads(1)

from functools import partial

from tests import tiny_models

tiny_llama = partial(tiny_models.tiny_llama, layers=5)



@pytest.fixture(scope="module")
def model_and_ids():
    torch.manual_seed(1)
    return tiny_llama(), torch.randint(0, 96, (3, 12))


def pre_norm_hidden_states(model, ids):
    """HF hidden states with the final norm disabled, so the last entry is the last layer's output."""
    norm = model.model.norm
    model.model.norm = nn.Identity()
    try:
        with torch.no_grad():
            return model(ids, output_hidden_states=True).hidden_states
    finally:
        model.model.norm = norm


def test_bi_from_hooks_matches_manual(model_and_ids):
    model, ids = model_and_ids
    states = pre_norm_hidden_states(model, ids)
    manual = [float((1 - F.cosine_similarity(states[i], states[i + 1], dim=-1)).mean()) for i in range(5)]
    assert block_influence(model, ids, batch_size=2) == pytest.approx(manual, rel=1e-5, abs=1e-7)


def test_last_layer_bi_is_pre_norm(model_and_ids):
    model, ids = tiny_llama(seed=3), model_and_ids[1]
    with torch.no_grad():
        # A non-uniform norm weight: with all ones, RMSNorm only rescales and cos cannot tell.
        model.model.norm.weight.uniform_(0.1, 2.0)
        post_norm = model(ids, output_hidden_states=True).hidden_states
    wrong = float((1 - F.cosine_similarity(post_norm[-2], post_norm[-1], dim=-1)).mean())
    assert block_influence(model, ids)[-1] != pytest.approx(wrong, rel=1e-3)


def test_angular_distance_matches_manual(model_and_ids):
    model, ids = model_and_ids
    states = pre_norm_hidden_states(model, ids)
    scores = layer_scores(model, ids)
    for size in (1, 2, 3):
        manual = []
        for start in range(5 - size + 1):
            cos = F.cosine_similarity(states[start][:, -1], states[start + size][:, -1], dim=-1)
            manual.append(float((torch.arccos(cos.clamp(-1, 1)) / math.pi).mean()))
        assert scores.angular_distances(size) == pytest.approx(manual, rel=1e-5, abs=1e-6)
        block = scores.best_block(size)
        assert block == list(range(block[0], block[0] + size))
        assert manual[block[0]] == min(manual)


def test_lowest_bi_order_and_exclusion(model_and_ids):
    model, ids = model_and_ids
    scores = layer_scores(model, ids)
    order = scores.lowest_bi(5)
    assert sorted(order) == list(range(5))
    assert [scores.block_influence[i] for i in order] == sorted(scores.block_influence)
    assert 4 not in scores.lowest_bi(4, exclude=(4,))


def test_loss_from_any_layer_matches_model_loss(model_and_ids):
    model, ids = model_and_ids
    stream = layer_scores(model, ids, batch_size=3).stream
    with torch.no_grad():
        reference = model(ids, labels=ids).loss
        walker = LayerWalker(model, stream)
        inputs = walker.dense_inputs([0, 3])
        for start in (0, 3):
            loss = walker.next_token_loss(inputs[start][0], 0, start)
            assert float(loss) == pytest.approx(float(reference), rel=1e-5)


def test_cached_layer_inputs_equal_recomputed_ones(model_and_ids):
    model, ids = model_and_ids
    cached = LayerWalker(model, layer_scores(model, ids, keep_inputs=True).stream).dense_inputs([1, 4])
    stepped = LayerWalker(model, layer_scores(model, ids, keep_inputs=False).stream).dense_inputs([1, 4])
    for index in (1, 4):
        assert torch.allclose(cached[index][0], stepped[index][0], atol=1e-6)


def test_half_precision_cache_keeps_the_chosen_layers_close_to_recomputed_ones(model_and_ids):
    model, ids = model_and_ids
    stream = layer_scores(model, ids, keep_inputs=True, keep_dtype=torch.float16).stream
    assert stream.layer_inputs[0][1].dtype == torch.float16
    stream.keep_only([1, 3], torch.float32)
    assert stream.layer_inputs is None and sorted(stream.cached) == [1, 3]
    exact = LayerWalker(model, layer_scores(model, ids).stream).dense_inputs([1, 3])
    kept = LayerWalker(model, stream).dense_inputs([1, 3])
    for index in (1, 3):
        for a, b in zip(kept[index], exact[index]):
            assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=2e-3, atol=1e-3)
