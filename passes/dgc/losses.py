"""The training losses on the saliencies: the saliency lasso (paper 002) and the angle enlargement
(paper 002 supplement, eq. 3), on a model's last forward or on given saliency tensors."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .module import _require_dgc


def lasso_of(saliencies: Sequence[torch.Tensor], weight: float = 1e-5) -> torch.Tensor:
    """λ_s · Σ_layers Σ_heads mean(|g_{l,h}|) over saliency tensors of shape N × H × C."""
    if not saliencies:
        raise ValueError("lasso_of: no saliency tensors")
    total = sum(g.abs().mean(dim=(0, 2)).sum() for g in saliencies)
    return total * weight


def angle_of(saliencies: Sequence[torch.Tensor], weight: float = 1e-4) -> torch.Tensor:
    """Angle-enlargement loss (paper 002 supplement, eq. 3) over saliency tensors N × H × C:
    λ_a · 2/(L·H·(H−1)) · Σ_l Σ_{i<j} |⟨g_i/‖g_i‖, g_j/‖g_j‖⟩|, averaged over the batch.
    Layers with one head contribute nothing (and are not counted in L)."""
    if not saliencies:
        raise ValueError("angle_of: no saliency tensors")
    terms, count = [], 0
    for g in saliencies:
        n, heads, _ = g.shape
        if heads < 2:
            continue
        u = F.normalize(g, dim=-1, eps=1e-12)
        cos = torch.einsum("nic,njc->nij", u, u).abs()
        upper = torch.triu(torch.ones(heads, heads, dtype=torch.bool, device=g.device), diagonal=1)
        terms.append(cos[:, upper].sum(-1).mean() * (2.0 / (heads * (heads - 1))))
        count += 1
    if not terms:
        return saliencies[0].new_zeros(())
    return weight * torch.stack(terms).sum() / count


def _last_saliencies(model: nn.Module, what: str) -> list[torch.Tensor]:
    mods = _require_dgc(model, what)
    missing = [p for p, m in mods if m.last_saliency is None]
    if missing:
        raise RuntimeError(f"{what}: no saliencies recorded for {', '.join(missing[:3])}"
                           f"{' ...' if len(missing) > 3 else ''}; run a forward pass of the model first")
    return [m.last_saliency for _, m in mods]


def saliency_lasso(model: nn.Module, weight: float = 1e-5) -> torch.Tensor:
    """The saliency-lasso loss of the model's last forward: λ_s · Σ_layers Σ_heads mean(|g|)
    (λ_s = 1e-5 in the paper). Differentiable when that forward was."""
    return lasso_of(_last_saliencies(model, "saliency_lasso"), weight)


def angle_enlargement(model: nn.Module, weight: float = 1e-4) -> torch.Tensor:
    """The angle-enlargement loss of the model's last forward (paper 002 supplement eq. 3,
    λ_a = 1e-4, used with the global threshold). See :func:`angle_of`."""
    return angle_of(_last_saliencies(model, "angle_enlargement"), weight)
