"""Random gating, the ablation of DGC's learned saliency: the same layers, the same k schedule and
MACs, but each head keeps a uniformly random set of C_in − k channels per sample (fresh draws at
every forward, training and evaluation), with gates of 1.

:func:`use_random_gating` replaces every layer's :class:`~.module.SaliencyGenerator` by a
:class:`RandomSaliency`, whose "saliencies" are ``1 + ε·(π_c + 1)/C`` for a uniformly random
permutation π of the C channels, drawn independently per sample and head: all values differ (no
ties; in float32 up to about 4 000 channels), so ranking them picks a uniformly random subset,
and the kept channels are scaled by 1 to within ε (default 1e-3). It has no parameters and no
MACs (``hidden = 0``). The draws come from the layer's own generator (seeded), so a run is
reproducible. Head-wise gating only (a global threshold on these values would be meaningless).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .module import _require_dgc


class RandomSaliency(nn.Module):
    """Random stand-in for a :class:`~.module.SaliencyGenerator`: N × H × C values ``1 + eps·(π + 1)/C``,
    π a random permutation of the channels per sample and head."""

    def __init__(self, in_channels: int, heads: int, *, eps: float = 1e-3, seed: int = 0):
        super().__init__()
        if not 0 < eps < 1:
            raise ValueError(f"RandomSaliency: eps must be in (0, 1), got {eps!r}")
        self.in_channels, self.heads, self.hidden, self.eps = in_channels, heads, 0, float(eps)
        self.init = "random"
        self.generator = torch.Generator().manual_seed(int(seed))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        c = self.in_channels
        perm = torch.rand(pooled.shape[0], self.heads, c, generator=self.generator).argsort(-1)
        return (1.0 + self.eps * (perm + 1).double() / c).to(device=pooled.device, dtype=pooled.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels} channels, heads={self.heads}, random, eps={self.eps:g}"


def use_random_gating(model: nn.Module, *, seed: int = 0, eps: float = 1e-3) -> list[str]:
    """Replace the saliency generator of every DGC layer of ``model`` by a :class:`RandomSaliency`
    (layer i seeded with ``seed + i``); the layers must use head-wise gating. Returns the paths."""
    paths = []
    for i, (path, m) in enumerate(_require_dgc(model, "use_random_gating")):
        if m.gating != "head":
            raise ValueError(f"use_random_gating: layer '{path}' uses {m.gating} gating; random gating is head-wise")
        w = m.weight
        m.saliency = RandomSaliency(m.in_channels, m.heads, eps=eps, seed=seed + i)
        m.saliency.to(device=w.device)
        paths.append(path)
    return paths
