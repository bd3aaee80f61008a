"""GRASP gradient attribution of singular groups.

Every target Linear is swapped for a SigmaLinear (only σ needs a gradient), the calibration set
is run from the lowest target layer up with the ordinary next-token loss, and the signed gradient
G = Σ_batches ∂L/∂σ is accumulated in an explicit buffer (not in `.grad`, bug B4). The score of
group k is the first-order Taylor estimate of the loss change when it is dropped: |σ_k · G_k|.
"""

from __future__ import annotations

import torch

from edgecompress.attribution.layer_walker import LayerWalker, set_submodule
from edgecompress.attribution.singular_basis import SigmaLinear, SingularBasis
from edgecompress.methods import check_score_metric


def _gradient_sums(walker: LayerWalker, start_layer: int, hidden: list[torch.Tensor], parameters: list,
                   project, progress) -> list[torch.Tensor]:
    """Σ over calibration batches of project(i, ∂L/∂parameters[i]), the loss run from `start_layer` up."""
    sums: list[torch.Tensor] | None = None
    for batch in range(walker.n_batches):
        with torch.enable_grad():
            loss = walker.next_token_loss(hidden[batch], batch, start_layer)
            gradients = torch.autograd.grad(loss, parameters)
        projected = [project(i, gradient.detach()) for i, gradient in enumerate(gradients)]
        sums = projected if sums is None else [total + part for total, part in zip(sums, projected)]
        if progress is not None:
            progress("gradient", batch + 1, walker.n_batches)
    return sums


def accumulated_sigma_gradients(walker: LayerWalker, bases: dict[str, SingularBasis], start_layer: int,
                                hidden: list[torch.Tensor], progress=None) -> dict[str, torch.Tensor]:
    """Σ over calibration batches of ∂L/∂σ for each Linear in `bases` (full module names).

    `hidden[b]` is the input of decoder layer `start_layer` for batch b; no target may sit below it.
    The model is restored before returning.
    """
    model = walker.model
    dtype = next(model.parameters()).dtype
    sigma_modules = {name: SigmaLinear(basis, dtype).to(hidden[0].device) for name, basis in bases.items()}
    originals = {name: set_submodule(model, name, module) for name, module in sigma_modules.items()}
    names = list(sigma_modules)
    try:
        sums = _gradient_sums(walker, start_layer, hidden, [sigma_modules[name].sigma for name in names],
                              lambda i, gradient: gradient.double().cpu(), progress)
    finally:
        for name, original in originals.items():
            set_submodule(model, name, original)
    return dict(zip(names, sums))


def weight_sigma_gradients(walker: LayerWalker, bases: dict[str, SingularBasis], start_layer: int,
                           hidden: list[torch.Tensor], progress=None) -> dict[str, torch.Tensor]:
    """The same sums as accumulated_sigma_gradients, from the stock model's ordinary weight gradients.

    With W = U diag(σ) Ṽᵀ (Ṽᵀ = Vt: Vᵀ for the weight basis, Vᵀ L⁻¹ for the whitened one), the chain rule gives
    ∂L/∂σ_k = u_kᵀ (∂L/∂W) ṽ_k. No module is swapped: the model runs as it is, so a sharded or offloaded model
    (FSDP2's fully_shard, an offload hook) gives the gradients its own way, and only ∂L/∂W [out, in] per target
    is held, never the U, Ṽ copies of SigmaLinear. Equal to the σ path to float64 rounding (tests/attribution).
    """
    names = list(bases)
    weights = [walker.model.get_submodule(name).weight for name in names]
    flags = [weight.requires_grad for weight in weights]

    def project(i: int, gradient: torch.Tensor) -> torch.Tensor:
        basis = bases[names[i]]
        g = gradient.double().to(basis.U.device)
        return ((basis.U.double().t() @ g) * basis.Vt.double()).sum(dim=1).cpu()

    try:
        for weight in weights:
            weight.requires_grad_(True)
        sums = _gradient_sums(walker, start_layer, hidden, weights, project, progress)
    finally:
        for weight, flag in zip(weights, flags):
            weight.requires_grad_(flag)
    return dict(zip(names, sums))


def group_scores(basis: SingularBasis, gradient_sum: torch.Tensor, metric: str = "taylor") -> torch.Tensor:
    """I_k = |σ_k · G_k| ("taylor", the GRASP default) or |G_k| ("gradient")."""
    if check_score_metric(metric) == "taylor":
        return (basis.sigma.double().cpu() * gradient_sum).abs()
    return gradient_sum.abs()
