"""The embedding stage of a method: factor the tied embedding / lm_head table for the method's share of the
budget (attribution/embedding.py) before the layers are chosen for the rest of it."""

from __future__ import annotations

from edgecompress.attribution.embedding import factor_embedding as factor_table
from edgecompress.attribution.embedding import tied_embedding
from edgecompress.attribution.plan_state import PlanState
from edgecompress.errors import EdgeCompressError
from edgecompress.plan import embedding_rank_for_share


def factor_embedding(state: PlanState) -> None:
    """The tied table's factors for the share (at most half the ratio), from the calibration's token frequencies
    and the recorded final states. Without a share, a ratio or a tie nothing happens; a share the table cannot
    give at all (or an untied head) goes back to the layers, and the options record a share of 0."""
    options, model, walker = state.options, state.model, state.walker
    if not options.embedding_share or state.ratio is None or walker is None:
        return
    try:
        tied_embedding(model)
    except EdgeCompressError:
        options.embedding_share = 0.0
        return
    share = min(options.embedding_share, state.ratio / 2)
    vocab, hidden = model.get_input_embeddings().weight.shape
    # At most an eighth of the vocabulary stays exact (smollm2's 49,152: the 2,048 asked; a tiny test vocabulary
    # keeps room to factor).
    exact = min(options.exact_tokens, max(1, vocab // 8))
    try:
        embedding_rank_for_share(vocab, hidden, state.dense_total, share, exact)
    except EdgeCompressError:
        options.embedding_share = 0.0
        return
    states = walker.stream.final_states
    gram = sum((s.reshape(-1, s.shape[-1]).double().t() @ s.reshape(-1, s.shape[-1]).double()) for s in states)
    tokens = sum(s.shape[0] * s.shape[1] for s in states)
    state.embedding, factors = factor_table(model, state.calib.input_ids, share, exact, hidden_gram=gram, n_tokens=tokens)
    state.builder.factors.update(factors)
    state.report("embedding factors", 1, 1)
