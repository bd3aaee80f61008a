"""A Linear replaced by its low-rank factors, W ≈ B A, as attribution, refits and the PyTorch reference
of a compressed build use it (`edgecompress.apply_plan` installs a whole plan with it)."""

from __future__ import annotations

import torch
from torch import nn

from edgecompress.attribution.layer_walker import set_submodule


class LowRankLinear(nn.Module):
    """W ≈ B A as two bias-free-then-biased Linears: in -> rank -> out."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        rank, in_features = a.shape
        out_features = b.shape[0]
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Linear(in_features, rank, bias=False)
        self.b = nn.Linear(rank, out_features, bias=bias is not None)
        with torch.no_grad():
            self.a.weight.copy_(a)
            self.b.weight.copy_(b)
            if bias is not None:
                self.b.bias.copy_(bias)

    def forward(self, x):
        return self.b(self.a(x))


def install_low_rank(model, module_name: str, a, b, bias=None) -> nn.Module:
    """Swap the Linear `module_name` for a LowRankLinear (same device and dtype); returns the old one."""
    old = model.get_submodule(module_name)
    weight = old.weight
    tensors = [None if t is None else torch.as_tensor(t).to(weight.device, weight.dtype) for t in (a, b, bias)]
    new = LowRankLinear(*tensors).to(device=weight.device, dtype=weight.dtype)
    return set_submodule(model, module_name, new)


def factor_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The factor weights of every LowRankLinear, MonarchLinear and BlastLinear in `layer` (what a refit trains)."""
    from edgecompress.attribution.structured import structured_parameters

    params = []
    for module in layer.modules():
        if isinstance(module, LowRankLinear):
            params += [module.a.weight, module.b.weight]
    return params + structured_parameters(layer)
