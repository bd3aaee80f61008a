"""The embedding stages of a method: the tied embedding / lm_head table takes the method's share of the budget
(attribution/embedding.py), the layers the rest.

Two stages, so that the table is factored only after the layers are chosen: `embedding_budget` (before the
layer choice) fixes the share, the exact tokens and the rank, hence the parameters the table gives up, from
arithmetic alone; `factor_embedding` (after the chosen layers' inputs are cached and the scoring pass's cache of
every layer is dropped) computes the factors. Measured on the default smollm2-135m build (128 windows,
bench/results/build-memory.json): the peak moved from 4.90 to 4.80 GB, and to 4.76 GB with the Gram-based
factorization; it still comes during this stage, not from the cache beside it nor from the SVD's workspace.
"""

from __future__ import annotations

from edgecompress.attribution.embedding import factor_embedding as factor_table
from edgecompress.attribution.embedding import tied_embedding
from edgecompress.attribution.plan_state import PlanState
from edgecompress.errors import EdgeCompressError
from edgecompress.plan import embedding_rank_for_share, embedding_saving


def embedding_budget(state: PlanState) -> None:
    """The share (at most half the ratio), exact tokens and rank of the tied table, and what it saves. Without a
    share, a ratio or a tie nothing happens; a share the table cannot give at all (or an untied head) goes back
    to the layers, and the options record a share of 0."""
    options, model = state.options, state.model
    if not options.embedding_share or state.ratio is None or state.walker is None:
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
        rank = embedding_rank_for_share(vocab, hidden, state.dense_total, share, exact)
    except EdgeCompressError:
        options.embedding_share = 0.0
        return
    state.embedding_budget = (share, exact, embedding_saving(vocab, hidden, rank, exact))


def factor_embedding(state: PlanState) -> None:
    """The tied table's factors for the budget, from the calibration's token frequencies and the recorded final
    states (they stay recorded when the per-layer cache is dropped)."""
    if state.embedding_budget is None:
        return
    share, exact, saving = state.embedding_budget
    states = state.walker.stream.final_states
    gram = sum((s.reshape(-1, s.shape[-1]).double().t() @ s.reshape(-1, s.shape[-1]).double()) for s in states)
    tokens = sum(s.shape[0] * s.shape[1] for s in states)
    state.embedding, factors = factor_table(state.model, state.calib.input_ids, share, exact, hidden_gram=gram,
                                            n_tokens=tokens)
    if state.embedding.saving != saving:  # the layer choice used the budget's arithmetic
        raise AssertionError(f"embedding saved {state.embedding.saving}, its budget said {saving}")
    state.builder.factors = {**factors, **state.builder.factors}  # the table's factors first, as plans list them
    state.report("embedding factors", 1, 1)
