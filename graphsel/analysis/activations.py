"""Statistics of activations under the BatchNorm-Gaussian model that the selective-convolution
paper (000, eq. 1) and group ECDM pruning share: a BN output channel is N(β, γ²)."""
from __future__ import annotations

import math

import torch


def relu_gaussian_mean(beta: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """E[max(X, 0)] for X ~ N(β, γ²) (paper 000, eq. 1): |γ|φ(β/|γ|) + βΦ(β/|γ|), float64;
    max(β, 0) as |γ| → 0."""
    beta = beta.detach().double()
    g = gamma.detach().double().abs()
    safe = g.clamp_min(eps)
    z = beta / safe
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    e = safe * pdf + beta * torch.special.ndtr(z)
    return torch.where(g > eps, e, beta.clamp_min(0.0))
