"""The pruning schedule (the authors'): the rate ξ and the pruned channels k as functions of training
progress, applied to a model's DGC layers by :func:`set_progress`."""
from __future__ import annotations

import math
from typing import Any

import torch.nn as nn

from .module import _check_ratio, _require_dgc

WARMUP_END = 1.0 / 12.0       # progress ≤ 1/12: no pruning
FINETUNE_START = 3.0 / 4.0    # progress ≥ 3/4: the full rate ξ


def _check_progress(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
        raise ValueError(f"progress must be a number in [0, 1] (fraction of training done), got {p!r}")
    return min(1.0, max(0.0, float(p)))


def schedule_ratio(ratio: float, progress: float) -> float:
    """The pruning rate at training ``progress`` p: 0 for p ≤ 1/12, ξ·1.5·(p − 1/12) in between,
    ξ for p ≥ 3/4 (the authors' schedule, continuous at both ends)."""
    _check_ratio(ratio)
    p = _check_progress(progress)
    if p <= WARMUP_END:
        return 0.0
    if p >= FINETUNE_START:
        return float(ratio)
    return float(ratio) * 1.5 * (p - WARMUP_END)


def schedule_k(in_channels: int, ratio: float, progress: float) -> int:
    """Channels pruned per head at ``progress``: 0 (p ≤ 1/12), round(C_in·ξ·1.5·(p − 1/12))
    (1/12 < p < 3/4), round(C_in·ξ) (p ≥ 3/4); Python's round, as the authors; at most C_in − 1."""
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    _check_ratio(ratio)
    p = _check_progress(progress)
    if p <= WARMUP_END:
        k = 0
    elif p >= FINETUNE_START:
        k = round(in_channels * ratio)
    else:
        k = round(in_channels * ratio * 1.5 * (p - WARMUP_END))
    return min(int(k), in_channels - 1)


def set_progress(model: nn.Module, progress: float) -> dict[str, int]:
    """Apply the pruning schedule at training ``progress`` ∈ [0, 1] to every DGC layer: sets each
    layer's ``k`` (head-wise gating) and ``scheduled_ratio`` (read by global calibration) from its
    own ξ. Returns {path: k}."""
    p = _check_progress(progress)
    out = {}
    for path, m in _require_dgc(model, "set_progress"):
        xi = float(m.ratio)
        m.set_k(schedule_k(m.in_channels, xi, p))
        m.scheduled_ratio.fill_(schedule_ratio(xi, p))
        out[path] = int(m.k)
    return out
