"""SVD-LLM truncation-aware whitening.

With calibration inputs X [n, N] of a Linear, S = X Xᵀ = L Lᵀ (Cholesky, float64). The SVD of
W L = U Σ Vᵀ gives W = U Σ (Vᵀ L⁻¹), and dropping group i costs exactly σ_i² of the layer's output
error ‖(W − W')X‖²_F, so keeping the largest whitened σ is optimal for that error.
"""

from __future__ import annotations

import torch
from torch import nn

from edgecompress.attribution.layer_walker import LayerWalker
from edgecompress.attribution.singular_basis import SingularBasis
from edgecompress.errors import EdgeCompressError


@torch.no_grad()
def input_grams(walker: LayerWalker, index: int, linears: dict[str, nn.Linear], hidden: list[torch.Tensor]):
    """Σ x xᵀ (float64) of each Linear's input over all calibration tokens, by running decoder layer
    `index` on its inputs `hidden` (per batch). Linears that share an input (q/k/v, gate/up) share one
    Gram matrix."""
    grams: dict[str, torch.Tensor] = {}
    shared: list[tuple[torch.Tensor, str]] = []  # inputs seen in this batch (kept alive) -> Linear
    handles = []

    def hook(name):
        def record(module, args):
            x = args[0]
            first = next((seen_name for seen, seen_name in shared if seen is x), None)
            if first is not None:  # same tensor as an earlier Linear: reuse its Gram
                grams[name] = grams[first]
                return
            shared.append((x, name))
            # Per-batch product in the activations' precision (fast), running sum in float64.
            flat = x.reshape(-1, x.shape[-1]).float()
            gram = (flat.t() @ flat).double()
            grams[name] = gram if name not in grams else grams[name] + gram

        return record

    for name, linear in linears.items():
        handles.append(linear.register_forward_pre_hook(hook(name)))
    try:
        for batch, batch_hidden in enumerate(hidden):
            shared.clear()
            walker.run_layer(index, batch_hidden, batch)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def cholesky_with_jitter(gram: torch.Tensor, jitter: float = 1e-6, attempts: int = 8) -> torch.Tensor:
    """Lower Cholesky factor of gram + eps·mean(diag)·I, growing eps until it succeeds."""
    n = gram.shape[0]
    scale = float(torch.diagonal(gram).mean().clamp_min(1e-30))
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    eps = jitter
    for _ in range(attempts):
        factor, info = torch.linalg.cholesky_ex(gram + eps * scale * eye)
        if int(info) == 0:
            return factor
        eps *= 10
    raise EdgeCompressError("whitening failed: the calibration Gram matrix is not positive definite")


@torch.no_grad()
def whitened_basis(linear: nn.Linear, gram: torch.Tensor, jitter: float = 1e-6) -> SingularBasis:
    """W = U diag(σ) (Vᵀ L⁻¹) from the SVD of W L, in float64."""
    lower = cholesky_with_jitter(gram.double(), jitter)
    weight = linear.weight.detach().to(torch.float64, copy=True).to(lower.device)
    u, sigma, vt = torch.linalg.svd(weight @ lower, full_matrices=False)
    # Vᵀ L⁻¹ without forming the inverse: solve X L = Vᵀ.
    vt_whitened = torch.linalg.solve_triangular(lower, vt, upper=False, left=False)
    bias = None if linear.bias is None else linear.bias.detach().float().clone()
    return SingularBasis(U=u, sigma=sigma, Vt=vt_whitened, bias=bias, kind="whitened")
