"""Monarch and BLAST Linears: PyTorch modules computing exactly what `kernels/reference.py` defines, and the
projections of a dense weight onto them.

Layouts are the reference's (x @ W with W [K, N] = in x out, i.e. a torch Linear's weight transposed):
Monarch W1 [b, p, R], W2 [b, R, q]; BLAST U [b, r, q], S [b, b, r], V [b, p, r].

Projections, optionally activation-aware: with the calibration Gram G = Σ x xᵀ of the Linear's input, the
output error ‖X (W − M)‖²_F = tr(Δᵀ G Δ) is approximated by its block-diagonal part Σ_l ‖L_lᵀ Δ_l‖²_F
(G_ll = L_l L_lᵀ, one Cholesky per input block). That keeps both structures intact (L_lᵀ only multiplies
input block l's factor), so the weighted problem is the plain one on W' = L_lᵀ W_l, mapped back after.
- Monarch: blockwise truncated SVD of each (input block l, output block k) pair, rank s = R / b; exact
  optimum (the pairs are independent).
- BLAST: alternating least squares over U, V, S (every step an exact minimiser of its block, so the error never
  grows), started from the truncated SVD of W with S = 1. With a Gram, BLAST keeps the *full* one (not only
  its diagonal blocks): it starts from SVD-LLM's whitened truncated SVD (S = 1, already the low-rank optimum
  at its rank), then U per output block and S per output block (all input blocks jointly) are exact weighted
  least squares, and V is updated input block by input block (block Gauss-Seidel). Measured on SmolLM2-135M
  layer 20 (rho 0.9, b = 4, 15 sweeps) this ends *below* SVD-LLM's low-rank error at the same parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from edgecompress.attribution.layer_walker import set_submodule
from edgecompress.attribution.low_rank import install_low_rank
from edgecompress.attribution.svd_llm import cholesky_with_jitter
from edgecompress.structures import STRUCTURES

# ALS sweeps. Measured on SmolLM2-135M layer 20 (rho 0.9, b = 4): relative Frobenius error 0.7550 / 0.7517 /
# 0.7492 after 10 / 40 / 100 sweeps on q_proj (the truncated-SVD start: 0.7497 at the larger low-rank rank).
BLAST_ITERATIONS = 30
BLAST_GRAM_ITERATIONS = 20  # full-Gram sweeps (each costs several K x K products)
# Ridge on the (mean-diagonal normalised) Gram of the full-Gram BLAST fit: directions the calibration inputs
# never reach (few tokens, or K > tokens) otherwise let V grow without bound (factors ~1e4 on a tiny model,
# which fp32 then cannot reproduce). SmolLM2-135M's 8192-token Grams are full rank: the cost there is nil.
BLAST_GRAM_RIDGE = 1e-3


class MonarchLinear(nn.Module):
    """Y = MonarchMatMul(X, W1, W2) + bias: block-diagonal, stride permutation, block-diagonal."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.blocks, per_in, self.channels = w1.shape
        self.in_features, self.out_features = self.blocks * per_in, self.blocks * w2.shape[2]
        self.w1 = nn.Parameter(torch.as_tensor(w1).clone())
        self.w2 = nn.Parameter(torch.as_tensor(w2).clone())
        self.bias = None if bias is None else nn.Parameter(torch.as_tensor(bias).clone())

    def forward(self, x):
        b, s = self.blocks, self.channels // self.blocks
        lead = x.shape[:-1]
        z = torch.einsum("nlp,lpc->nlc", x.reshape(-1, b, x.shape[-1] // b), self.w1)  # [n, l, k·s + t]
        routed = z.reshape(-1, b, b, s).transpose(1, 2).reshape(-1, b, self.channels)  # [n, k, l·s + t]
        y = torch.einsum("nkc,kcq->nkq", routed, self.w2).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def plan_factors(self) -> dict[str, torch.Tensor]:
        return {"W1": self.w1, "W2": self.w2}


class BlastLinear(nn.Module):
    """Y = BlastMatMul(X, U, S, V) + bias: Y_k = Σ_l ((X_l V_l) ⊙ S[l, k]) U_k."""

    def __init__(self, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.blocks, per_in, self.rank = v.shape
        self.in_features, self.out_features = self.blocks * per_in, self.blocks * u.shape[2]
        self.u = nn.Parameter(torch.as_tensor(u).clone())
        self.s = nn.Parameter(torch.as_tensor(s).clone())
        self.v = nn.Parameter(torch.as_tensor(v).clone())
        self.bias = None if bias is None else nn.Parameter(torch.as_tensor(bias).clone())

    def forward(self, x):
        b = self.blocks
        lead = x.shape[:-1]
        y_blocks = torch.einsum("nlp,lpr->nlr", x.reshape(-1, b, x.shape[-1] // b), self.v)
        coupled = torch.einsum("nlr,lkr->nkr", y_blocks, self.s)
        y = torch.einsum("nkr,krq->nkq", coupled, self.u).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def plan_factors(self) -> dict[str, torch.Tensor]:
        return {"U": self.u, "S": self.s, "V": self.v}


def install_structured(model, module_name: str, structure: str, factors: dict, bias=None) -> nn.Module:
    """Swap the Linear `module_name` for the structure's module built from `factors` (by factor name; same
    device and dtype); returns the old one. Low-rank factors become attribution/low_rank.py's module."""
    entry = STRUCTURES[structure]
    if entry.torch_module is None:
        return install_low_rank(model, module_name, *(factors[name] for name in entry.factor_names), bias)
    old = model.get_submodule(module_name)
    weight = old.weight

    def tensor(value):
        return None if value is None else torch.as_tensor(value).to(weight.device, weight.dtype)

    parts = [tensor(factors[name]) for name in entry.factor_names]
    new = entry.torch_class()(*parts, tensor(bias)).to(device=weight.device, dtype=weight.dtype)
    return set_submodule(model, module_name, new)


def structured_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The factor weights (not biases) of every Monarch/BLAST module in `layer` (what a refit trains)."""
    params = []
    for module in layer.modules():
        if isinstance(module, (MonarchLinear, BlastLinear)):
            params += list(module.plan_factors().values())
    return params


# ---------------------------------------------------------------- projections


def _block_whiteners(gram: torch.Tensor | None, blocks: int, jitter: float) -> torch.Tensor | None:
    """L_l [b, p, p] (lower Cholesky of each input block's Gram), or None for the plain Frobenius norm."""
    if gram is None:
        return None
    per_in = gram.shape[0] // blocks
    return torch.stack([
        cholesky_with_jitter(gram[l * per_in:(l + 1) * per_in, l * per_in:(l + 1) * per_in].double(), jitter)
        for l in range(blocks)
    ])


def _whiten(weight: torch.Tensor, lower: torch.Tensor | None, blocks: int) -> torch.Tensor:
    """W [K, N] → [b, p, N] with each input block l multiplied by L_lᵀ."""
    rows = weight.reshape(blocks, -1, weight.shape[1])
    return rows if lower is None else lower.transpose(1, 2) @ rows


def _unwhiten(factor: torch.Tensor, lower: torch.Tensor | None) -> torch.Tensor:
    """An input-side factor [b, p, c] from the whitened space back: L_l^{-T} · factor_l."""
    if lower is None:
        return factor
    return torch.linalg.solve_triangular(lower.transpose(1, 2), factor, upper=True)


@torch.no_grad()
def project_monarch(weight: torch.Tensor, blocks: int, channels: int, gram: torch.Tensor | None = None,
                    jitter: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(W1, W2) of the best Monarch approximation of `weight` [K, N] (reference layout), float32."""
    n_out = weight.shape[1]
    b, s = blocks, channels // blocks
    lower = _block_whiteners(gram, b, jitter)
    rows = _whiten(weight.double(), lower, b)  # [l, p', N]
    pairs = rows.reshape(b, rows.shape[1], b, n_out // b).transpose(1, 2)  # [l, k, p, q]
    u, sigma, vt = torch.linalg.svd(pairs, full_matrices=False)
    root = sigma[..., :s].sqrt()
    left = u[..., :s] * root[..., None, :]  # [l, k, p, s]
    right = vt[..., :s, :] * root[..., :, None]  # [l, k, s, q]
    w1 = _unwhiten(left.permute(0, 2, 1, 3).reshape(b, -1, channels), lower)  # [l, p, k·s + t]
    w2 = right.permute(1, 0, 2, 3).reshape(b, channels, n_out // b)  # [k, l·s + t, q]
    return w1.float().contiguous(), w2.float().contiguous()


def _solve_spd(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """matrix⁻¹ rhs for batches of small symmetric positive semi-definite systems, ridge-regularised."""
    scale = torch.diagonal(matrix, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    return torch.linalg.solve(matrix + 1e-10 * scale[..., None, None] * eye, rhs)


@torch.no_grad()
def project_blast(weight: torch.Tensor, blocks: int, rank: int, gram: torch.Tensor | None = None,
                  jitter: float = 1e-6, iterations: int = BLAST_ITERATIONS):
    """(U, S, V) of a BLAST approximation of `weight` [K, N] by alternating least squares, float32; with
    `gram`, minimising the error on the calibration inputs (the full Gram; see the module docstring)."""
    if gram is not None:
        u, s, v = _blast_full_gram(weight.double(), blocks, rank, gram.double().to(weight.device), jitter,
                                   BLAST_GRAM_ITERATIONS)
        u, s, v = _balanced(u, s, v)
        return u.float().contiguous(), s.float().contiguous(), v.float().contiguous()
    n_out = weight.shape[1]
    b = blocks
    rows = weight.double().reshape(b, -1, n_out)  # [l, p, N]
    left, sigma, right = torch.linalg.svd(rows.reshape(-1, n_out), full_matrices=False)
    root = sigma[:rank].sqrt()
    v = (left[:, :rank] * root).reshape(b, -1, rank)  # [l, p, r]
    u = (root[:, None] * right[:rank]).reshape(rank, b, -1).transpose(0, 1).contiguous()  # [k, r, q]
    s = torch.ones(b, b, rank, dtype=torch.float64)
    for _ in range(iterations):
        # Every right-hand side is one batched matmul against W's blocks (never an [l, p, k, q, r] product).
        vw = (v.transpose(1, 2) @ rows).reshape(b, rank, b, -1)  # V_lᵀ W_l: [l, r, k, q]
        gram_v = v.transpose(1, 2) @ v  # [l, r, r]
        lhs = torch.einsum("lkr,lkt,lrt->krt", s, s, gram_v)
        u = _solve_spd(lhs, torch.einsum("lkr,lrkq->krq", s, vw))
        gram_u = u @ u.transpose(1, 2)  # [k, r, r]
        lhs = torch.einsum("lkr,lkt,krt->lrt", s, s, gram_u)
        coupled = (s.permute(0, 2, 1)[..., None] * u.transpose(0, 1)[None]).reshape(b, rank, -1)  # C_l [l, r, N]
        v = _solve_spd(lhs, coupled @ rows.transpose(1, 2)).transpose(1, 2)  # V_l = W_l C_lᵀ (C_l C_lᵀ)⁻¹
        vw = (v.transpose(1, 2) @ rows).reshape(b, rank, b, -1)
        gram_v = v.transpose(1, 2) @ v
        lhs = gram_v[:, None] * gram_u[None, :]  # [l, k, r, r]
        s = _solve_spd(lhs, torch.einsum("lrkq,krq->lkr", vw, u)[..., None])[..., 0]
    u, s, v = _balanced(u, s, v)
    return u.float().contiguous(), s.float().contiguous(), v.float().contiguous()


def _blast_full_gram(w, b: int, rank: int, gram, jitter: float, iterations: int):
    """Minimise tr(Δᵀ G Δ), Δ = W − BLAST(U, S, V), G the full input Gram (float64 throughout)."""
    k_in, n_out = w.shape
    p, q = k_in // b, n_out // b
    g = gram / torch.diagonal(gram).mean().clamp_min(1e-30)
    g = g + BLAST_GRAM_RIDGE * torch.eye(k_in, dtype=g.dtype, device=g.device)
    lower = cholesky_with_jitter(g, jitter)
    left, sigma, right = torch.linalg.svd(lower.t() @ w, full_matrices=False)  # SVD-LLM's whitened SVD
    root = sigma[:rank].sqrt()
    v = torch.linalg.solve_triangular(lower.t(), left[:, :rank] * root, upper=True).reshape(b, p, rank)
    u = (root[:, None] * right[:rank]).reshape(rank, b, q).transpose(0, 1).contiguous()
    s = torch.ones(b, b, rank, dtype=w.dtype, device=w.device)
    gw = g @ w
    diagonal_blocks = torch.stack([g[l * p:(l + 1) * p, l * p:(l + 1) * p] for l in range(b)])
    for _ in range(iterations):
        # U_k: with A_k = [V_l diag(S[l, k])]_l [K, r], (A_kᵀ G A_k) U_k = A_kᵀ G W_k.
        a = (v[:, None] * s[:, :, None, :]).permute(1, 0, 2, 3).reshape(b, k_in, rank)
        ga = g @ a
        u = _solve_spd(a.transpose(1, 2) @ ga, ga.transpose(1, 2) @ w.reshape(k_in, b, q).transpose(0, 1))
        # S[:, k], all input blocks jointly: normal matrix (Vᵀ G V)[(l,i),(m,j)] · (U_k U_kᵀ)[i, j].
        spread = torch.block_diag(*v)  # [K, b·r]
        lhs = (spread.t() @ g @ spread)[None] * (u @ u.transpose(1, 2)).repeat(1, b, b)
        rhs = torch.einsum("lpr,lpkq,krq->klr", v, gw.reshape(b, p, b, q), u).reshape(b, b * rank, 1)
        s = _solve_spd(lhs, rhs)[..., 0].reshape(b, b, rank).transpose(0, 1).contiguous()
        # V_l, one input block at a time: the exact block step V_l += G_ll⁻¹ (G Δ)_l C_lᵀ (C_l C_lᵀ)⁻¹.
        coupled = (s.permute(0, 2, 1)[..., None] * u.transpose(0, 1)[None]).reshape(b, rank, n_out)  # C_l
        residual = g @ (w - torch.bmm(v, coupled).reshape(k_in, n_out))
        for l in range(b):
            c = coupled[l]
            right_side = _solve_spd(c @ c.t(), c @ residual[l * p:(l + 1) * p].t()).t()  # (G Δ)_l C_lᵀ (C_l C_lᵀ)⁻¹
            step = _solve_spd(diagonal_blocks[l], right_side)
            v[l] += step
            residual -= g[:, l * p:(l + 1) * p] @ (step @ c)
    return u, s, v


def _balanced(u, s, v):
    """Rescale each rank component so U, S and V carry equal norms (same product): a refit's Adam steps
    then move every factor by comparable relative amounts."""
    norms = [v.norm(dim=(0, 1)), s.norm(dim=(0, 1)), u.norm(dim=(0, 2))]
    target = (norms[0] * norms[1] * norms[2]).clamp_min(1e-30) ** (1 / 3)
    gains = [target / n.clamp_min(1e-30) for n in norms]
    return u * gains[2][None, :, None], s * gains[1], v * gains[0]
