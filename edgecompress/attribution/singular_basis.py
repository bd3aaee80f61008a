"""A Linear's weight as a sum of singular groups, W = U diag(sigma) Vt, and the factors kept from it.

`Vt` is the *effective* right factor: plain Vᵀ for an SVD of W, or Vᵀ L⁻¹ for the whitened SVD
of W L (SVD-LLM). In both cases U diag(sigma) Vt == W, so keeping a subset S of groups gives
A = diag(√sigma_S) Vt_S [k, in] and B = U_S diag(√sigma_S) [out, k], with W ≈ B A.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SingularBasis:
    U: torch.Tensor  # [out, r]
    sigma: torch.Tensor  # [r], descending
    Vt: torch.Tensor  # [r, in]
    bias: torch.Tensor | None
    kind: str = "weight"  # "weight" | "whitened"

    @property
    def rank(self) -> int:
        return int(self.sigma.numel())

    def factors(self, kept: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [k, in], B [out, k]) in fp32 for the kept group indices."""
        index = torch.as_tensor(sorted(kept), dtype=torch.long)
        root = self.sigma[index].clamp_min(0).sqrt()
        a = root[:, None] * self.Vt[index]
        b = self.U[:, index] * root[None, :]
        return a.float().contiguous(), b.float().contiguous()


def top_indices(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` highest scores, ties broken by index (deterministic), sorted."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return sorted(order[:count].tolist())


def score_summary(scores: torch.Tensor, kept: list[int], metric: str) -> dict:
    """Small JSON summary of one matrix's group scores."""
    scores = scores.double()
    total = float(scores.sum())
    kept_scores = scores[torch.as_tensor(kept, dtype=torch.long)]
    largest_sigma_kept = sum(1 for i in kept if i < len(kept))
    return {
        "metric": metric,
        "groups": int(scores.numel()),
        "kept_fraction_of_score": float(kept_scores.sum()) / total if total > 0 else 0.0,
        "max": float(scores.max()),
        "kept_min": float(kept_scores.min()),
        "overlap_with_largest_sigma": largest_sigma_kept,
    }


class SigmaLinear(nn.Module):
    """y = ((x Vtᵀ) * sigma) Uᵀ + bias with only sigma trainable; equals the original Linear at
    init. Never materializes W, and keeps the bias (the official code drops it, bug B5)."""

    def __init__(self, basis: SingularBasis, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("u", basis.U.to(dtype).contiguous())
        self.register_buffer("v", basis.Vt.t().to(dtype).contiguous())
        self.sigma = nn.Parameter(basis.sigma.to(dtype).clone())
        bias = None if basis.bias is None else basis.bias.to(dtype)
        self.register_buffer("bias", bias)

    def forward(self, x):
        y = ((x @ self.v) * self.sigma) @ self.u.t()
        return y if self.bias is None else y + self.bias
