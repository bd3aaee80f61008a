"""Plain SVD of a Linear's weight; truncation keeps the largest singular values."""

from __future__ import annotations

import torch
from torch import nn

from edgecompress.attribution.singular_basis import SingularBasis


@torch.no_grad()
def weight_basis(linear: nn.Linear, dtype: torch.dtype = torch.float32) -> SingularBasis:
    """Thin SVD W = U diag(sigma) Vᵀ with all r = min(out, in) groups."""
    weight = linear.weight.detach().to(dtype)
    u, sigma, vt = torch.linalg.svd(weight, full_matrices=False)
    bias = None if linear.bias is None else linear.bias.detach().float().clone()
    return SingularBasis(U=u, sigma=sigma, Vt=vt, bias=bias, kind="weight")


def largest_sigma(basis: SingularBasis, rank: int) -> list[int]:
    """The first `rank` groups: sigma is sorted in descending order."""
    return list(range(min(rank, basis.rank)))
