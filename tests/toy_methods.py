"""A toy selection rule for tests/test_methods.py: a new method's stage function, as a user's own would be."""

from __future__ import annotations

import torch

from edgecompress.attribution.layer_walker import decoder_layers, layer_linears
from edgecompress.attribution.singular_basis import score_summary
from edgecompress.attribution.svd import weight_basis
from edgecompress.plan import low_rank_rank


@torch.no_grad()
def smallest_sigma_factors(state) -> None:
    """Keep each chosen Linear's *smallest* singular groups (the worst choice there is: it tests the seam)."""
    layers = decoder_layers(state.model)
    for index in state.chosen:
        for name, linear in layer_linears(layers[index]).items():
            basis = weight_basis(linear)
            rank = low_rank_rank(linear.out_features, linear.in_features, state.rho)
            kept = list(range(basis.rank - rank, basis.rank))  # sigma is descending
            state.builder.add(index, name, linear, basis, kept, score_summary(-basis.sigma.double(), kept, "-sigma"))
