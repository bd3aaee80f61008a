"""The tied embedding / lm_head table as part of the compression budget (GroupReduce's idea in its two-group form).

The K most frequent calibration tokens keep their rows exactly; the other V−K rows become a·b from a weighted
SVD: M = diag(√f)·E_rest·C^{1/2} (f: token frequencies, how often a row is looked up; C: the covariance of the
final normed hidden states, what the head multiplies the rows with), rank-r truncated, mapped back with
diag(1/√f) and C^{-1/2}. Plain SVD of E diverges (docs: compression-quality-literature §5): only the doubly
weighted fit is usable. Float64 throughout; nothing is trained here (a refit may train exact, a and b after).

`FactoredEmbedding` computes the lookup and the head logits from the factors as the ONNX graph of
passes/factor_embedding.py does, with one set of tensors for both uses (the tie is kept when a refit trains them).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgecompress.attribution.layer_walker import set_submodule
from edgecompress.errors import EdgeCompressError
from edgecompress.plan import (
    EMBEDDING_FACTORS,
    EmbeddingPlan,
    embedding_params,
    embedding_rank_for_share,
)

__all__ = ["FactoredEmbedding", "FactoredHead", "embedding_rank_for_share", "factor_embedding",
           "hidden_gram", "install_factored_embedding", "tied_embedding"]


# ---------------------------------------------------------------- the torch modules


class FactoredEmbedding(nn.Module):
    """E ≈ [exact; a·b] in the token order `order` (exact tokens first). forward(ids) is the lookup,
    logits(h) the tied head; `position[t]` is token t's row in that order."""

    def __init__(self, exact: torch.Tensor, a: torch.Tensor, b: torch.Tensor, order: torch.Tensor):
        super().__init__()
        self.exact, self.a, self.b = (nn.Parameter(torch.as_tensor(t).clone()) for t in (exact, a, b))
        order = torch.as_tensor(order, dtype=torch.long)
        self.register_buffer("order", order.clone())
        self.register_buffer("position", torch.argsort(order))
        self.num_embeddings, self.embedding_dim = order.numel(), self.exact.shape[1]

    @property
    def exact_tokens(self) -> int:
        return self.exact.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        row = self.position[input_ids]
        k = self.exact_tokens
        exact = self.exact[row.clamp(max=k - 1)]
        rest = self.a[(row - k).clamp(min=0)] @ self.b
        return torch.where((row < k).unsqueeze(-1), exact, rest)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """h·Eᵀ: exact columns and low-rank columns, put back in token order."""
        columns = torch.cat([hidden @ self.exact.t(), (hidden @ self.b.t()) @ self.a.t()], dim=-1)
        return columns[..., self.position]

    def plan_factors(self) -> dict[str, torch.Tensor]:
        """The trained tensors by factor name (what a refit writes back); the int64 order never changes."""
        return {"exact": self.exact, "a": self.a, "b": self.b}

    def dense_table(self) -> torch.Tensor:
        """The [V, d] table the factors stand for (checks and tests)."""
        return torch.cat([self.exact, self.a @ self.b])[self.position]


class FactoredHead(nn.Module):
    """The lm_head of a FactoredEmbedding: holds the same module, so the factors stay tied."""

    def __init__(self, embedding: FactoredEmbedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embedding.logits(hidden)


def _module_name(model, module) -> str:
    return next(name for name, found in model.named_modules() if found is module)


def tied_embedding(model) -> tuple[str, str, torch.Tensor]:
    """(embedding module name, head module name, the shared weight); refuses an untied head."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    weight = getattr(embed, "weight", None)
    if weight is None or head is None or getattr(head, "weight", None) is not weight:
        raise EdgeCompressError("embedding factorization needs a tied lm_head")
    return _module_name(model, embed), _module_name(model, head), weight


def install_factored_embedding(model, factors: dict) -> dict[str, nn.Module]:
    """Swap the tied embed_tokens / lm_head for one FactoredEmbedding (+ its FactoredHead) built from
    `factors` (exact, a, b, order by name, or by `<module>.<name>`); returns {module name: original}."""
    embed_name, head_name, weight = tied_embedding(model)
    arrays = [factors.get(name, factors.get(f"{embed_name}.{name}")) for name in EMBEDDING_FACTORS]
    if any(array is None for array in arrays):
        raise EdgeCompressError(f"embedding factors miss one of {', '.join(EMBEDDING_FACTORS)}")
    exact, a, b = (torch.as_tensor(t).to(weight.device, weight.dtype) for t in arrays[:3])
    if exact.shape[0] + a.shape[0] != weight.shape[0] or exact.shape[1] != weight.shape[1]:
        raise EdgeCompressError(f"embedding factors do not give this model's {list(weight.shape)} table")
    embedding = FactoredEmbedding(exact, a, b, torch.as_tensor(arrays[3])).to(weight.device)
    return {embed_name: set_submodule(model, embed_name, embedding),
            head_name: set_submodule(model, head_name, FactoredHead(embedding))}


# ---------------------------------------------------------------- statistics


def _batches(input_ids) -> list[torch.Tensor]:
    """[N, T] windows or a list of [n, T] batches, as a list of 2-D tensors."""
    if isinstance(input_ids, torch.Tensor):
        return [input_ids if input_ids.dim() == 2 else input_ids[None]]
    return [torch.as_tensor(batch).reshape(-1, torch.as_tensor(batch).shape[-1]) for batch in input_ids]


@torch.no_grad()
def hidden_gram(model, input_ids, batch_size: int = 1) -> tuple[torch.Tensor, int]:
    """(Σ hᵀh in float64 [d, d], token count) over the final normed hidden states of the calibration windows."""
    device = next(model.parameters()).device
    gram, count = None, 0
    for windows in _batches(input_ids):
        for start in range(0, windows.shape[0], batch_size):
            states = model.model(input_ids=windows[start:start + batch_size].to(device)).last_hidden_state
            states = states.reshape(-1, states.shape[-1]).double()
            gram = states.t() @ states if gram is None else gram + states.t() @ states
            count += states.shape[0]
    return gram.cpu(), count


def token_counts(input_ids, vocab: int) -> np.ndarray:
    ids = torch.cat([batch.reshape(-1) for batch in _batches(input_ids)]).cpu().numpy()
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise EdgeCompressError(f"calibration token ids fall outside the vocabulary of {vocab}")
    return np.bincount(ids, minlength=vocab)


def token_order(counts: np.ndarray, exact_tokens: int) -> np.ndarray:
    """The K most frequent token ids (ties by lower id), most frequent first, then the rest ascending."""
    ids = np.arange(counts.size)
    exact = np.lexsort((ids, -counts))[:exact_tokens]
    rest = np.setdiff1d(ids, exact)  # sorted
    return np.concatenate([exact, rest]).astype(np.int64)


def _covariance_roots(covariance: torch.Tensor, jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """C^{1/2} and C^{-1/2} by eigh; eigenvalues clamped at jitter·mean (directions the head never sees)."""
    values, vectors = torch.linalg.eigh(covariance.double())
    values = values.clamp_min(jitter * float(values.mean().clamp_min(1e-30)))
    return (vectors * values.sqrt()) @ vectors.t(), (vectors * values.rsqrt()) @ vectors.t()


# ---------------------------------------------------------------- the weighted factorization


class WeightedBasis:
    """The SVD U·diag(σ)·Vᵀ of M = diag(√f)·E_rest·C^{1/2} over the non-exact rows, float64; truncating it at
    rank r gives a = diag(1/√f)·U_r·diag(√σ_r), b = diag(√σ_r)·V_rᵀ·C^{-1/2}.

    σ and V come from the eigendecomposition of the d×d Gram MᵀM, and only the r columns U_r = M·V_r/σ_r that a
    factorization uses are formed, instead of a full SVD of the (V−K)×d matrix (its U and LAPACK's workspace): on
    smollm2-135m's table a·b within 1.3e-13 of the SVD's, 18.5 s against 22.8 s. Squaring M squares its condition
    number: kept directions are the largest, whose relative accuracy stays near eps·(σ_1/σ_r)²."""

    def __init__(self, table: torch.Tensor, frequencies: np.ndarray, covariance: torch.Tensor, order: np.ndarray,
                 exact_tokens: int, jitter: float):
        table = table.detach().double().cpu()
        root, self.inverse_root = _covariance_roots(covariance, jitter)
        weights = torch.as_tensor(frequencies, dtype=torch.float64).sqrt()
        self.order, self.exact_tokens = order, exact_tokens
        # ‖diag(√f)·E·C^{1/2}‖² over the whole table: what the exact rows keep without error counts too.
        self.table_energy = float(((weights[:, None] * (table @ root)) ** 2).sum())
        rest = torch.as_tensor(order[exact_tokens:])
        self.rest_rows, self.rest_weights = table[rest], weights[rest]
        self.exact_rows = table[torch.as_tensor(order[:exact_tokens])]
        del table
        self.weighted = self.rest_weights[:, None] * (self.rest_rows @ root)  # M
        values, vectors = torch.linalg.eigh(self.weighted.t() @ self.weighted)
        self.sigma = values.flip(0).clamp_min(0.0).sqrt()
        self.vt = vectors.flip(1).t().contiguous()

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a [V−K, r], b [r, d]) in float64."""
        sigma = self.sigma[:rank].clamp_min(torch.finfo(torch.float64).tiny)
        root_sigma = sigma.sqrt()
        u = (self.weighted @ self.vt[:rank].t()) / sigma  # U_r
        a = u * root_sigma / self.rest_weights[:, None]
        b = (root_sigma[:, None] * self.vt[:rank]) @ self.inverse_root
        return a, b

    def _relative_frobenius(self, a: torch.Tensor, b: torch.Tensor, rows: int = 8192) -> float:
        """‖a·b − E_rest‖ / ‖E_rest‖, a block of rows at a time (no (V−K)×d product held)."""
        error = sum(float(((a[i:i + rows] @ b - self.rest_rows[i:i + rows]) ** 2).sum())
                    for i in range(0, a.shape[0], rows))
        return (error / float((self.rest_rows ** 2).sum())) ** 0.5

    def scores(self, rank: int, counts: np.ndarray) -> dict:
        """Relative errors per token set: weighted (the fitted objective) and plain Frobenius."""
        energy = self.sigma.square()
        dropped = float(energy[rank:].sum())
        a, b = self.factors(rank)
        frobenius = self._relative_frobenius(a, b)
        seen = max(int(counts.sum()), 1)
        exact_count = int(counts[self.order[:self.exact_tokens]].sum())
        return {
            "metric": "relative_error",
            "weighting": "rows by sqrt(token frequency), columns by C^1/2 of the final normed hidden states",
            "exact": {"tokens": self.exact_tokens, "calibration_coverage": exact_count / seen, "weighted_error": 0.0},
            "rest": {"tokens": int(self.order.size - self.exact_tokens), "calibration_coverage": 1 - exact_count / seen,
                     "weighted_error": (dropped / float(energy.sum())) ** 0.5, "frobenius_error": frobenius},
            "table": {"weighted_error": (dropped / self.table_energy) ** 0.5},
            "calibration_tokens": int(counts.sum()),
            "distinct_tokens": int((counts > 0).sum()),
        }


def frequencies_from_counts(counts: np.ndarray) -> np.ndarray:
    """bincount + 0.5, normalised: unseen tokens keep a small weight (their rows must stay usable)."""
    smoothed = counts.astype(np.float64) + 0.5
    return smoothed / smoothed.sum()


def factor_embedding(model, input_ids, share: float | None, exact_tokens: int = 2048, jitter: float = 1e-8, *,
                     batch_size: int = 1, hidden_gram: torch.Tensor | None = None, n_tokens: int | None = None,
                     rank: int | None = None) -> tuple[EmbeddingPlan, dict[str, np.ndarray]]:
    """Factor the tied table of `model` for `share` of all its parameters (or at `rank`, share None).

    input_ids: calibration windows ([N, T] tensor or a list of batches): token frequencies always, and the hidden
    covariance unless `hidden_gram` (Σ hᵀh of the final normed states) and `n_tokens` are given. Returns the plan
    record and its factors by `<module>.<name>` (float32, order int64). The model is not changed."""
    embed_name, head_name, weight = tied_embedding(model)
    vocab, hidden = weight.shape
    total = sum(p.numel() for p in model.parameters())  # the tied table once
    if rank is None:
        rank = embedding_rank_for_share(vocab, hidden, total, share, exact_tokens)
    elif not (1 <= exact_tokens < vocab and 1 <= rank <= min(vocab - exact_tokens, hidden)):
        raise EdgeCompressError(f"rank {rank} with {exact_tokens} exact tokens does not fit a {vocab} x {hidden} table")
    if hidden_gram is None:
        hidden_gram, n_tokens = _model_hidden_gram(model, input_ids, batch_size)
    counts = token_counts(input_ids, vocab)
    order = token_order(counts, exact_tokens)
    basis = WeightedBasis(weight, frequencies_from_counts(counts), hidden_gram.double() / n_tokens, order,
                          exact_tokens, jitter)
    a, b = basis.factors(rank)
    scores = {**basis.scores(rank, counts), "hidden_tokens": int(n_tokens), "jitter": jitter}
    record = EmbeddingPlan(
        module=embed_name, head=head_name, vocab=vocab, hidden=hidden, rank=rank, exact_tokens=exact_tokens,
        share=None if share is None else float(share), params_before=vocab * hidden,
        params_after=embedding_params(vocab, hidden, rank, exact_tokens), index_bytes=order.nbytes, scores=scores,
    )
    arrays = {"exact": basis.exact_rows.float(), "a": a.float(), "b": b.float()}
    factors = {record.factor_key(name): tensor.contiguous().numpy() for name, tensor in arrays.items()}
    factors[record.factor_key("order")] = order
    return record, factors


def _model_hidden_gram(model, input_ids, batch_size: int) -> tuple[torch.Tensor, int]:
    was_training = model.training
    model.eval()
    try:
        return hidden_gram(model, input_ids, batch_size)
    finally:
        model.train(was_training)
