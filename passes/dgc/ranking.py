"""Ranking channels by saliency: the cut of the gating, in eager mode and under ``torch.export``.

Tie-breaking. Channels are ranked by |g| with ties broken towards the lower channel index
(stable sort), so exactly C_in − k channels are kept per head and sample (the authors' code
prunes every channel tied with the k-th smallest). Under ``torch.export`` (and so ONNX) the cut
is made explicit with ``topk`` values and a cumulative count of the ties, which selects the same
set.
"""
from __future__ import annotations

import torch


def _exporting() -> bool:
    return torch.compiler.is_compiling()


def _rank(key: torch.Tensor, width: int, exporting: bool) -> torch.Tensor:
    """Indices of the ``width`` largest entries of ``key`` along the last dim, ties → lower index.

    Eager: a stable sort. Export: ``topk`` breaks ties arbitrarily in PyTorch (ONNX's TopK by
    lower index) and the stable sort has no ONNX translation, so the cut is made explicit: the
    ``width``-th largest value v, everything above v, and the first of the entries equal to v
    (cumulative count) up to ``width``; the kept set is returned in index order."""
    if not exporting:
        return torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :width]
    c = key.shape[-1]
    kth = torch.topk(key, width, dim=-1, largest=True, sorted=True).values[..., -1:]
    above, tied = key > kth, key == kth
    need = width - above.sum(-1, keepdim=True)
    keep = above | (tied & (torch.cumsum(tied.to(torch.int64), -1) <= need))
    score = keep.to(torch.float32) * (c + 1) + torch.arange(c, 0, -1, device=key.device, dtype=torch.float32)
    return torch.topk(score, width, dim=-1, largest=True, sorted=True).indices
