"""Random selective-conv states, to check exports and round trips without training."""
from __future__ import annotations

import torch
import torch.nn as nn

from .module import selective_modules


@torch.no_grad()
def randomize_state(model: nn.Module, generator: torch.Generator | None = None, *, p_closed: float = 0.3,
                    p_copy: float = 0.3, max_shift: float = 2.5, integer_shifts: bool = False) -> nn.Module:
    """Give every SelectiveConv2d of ``model`` a random state: each slot is closed with probability
    ``p_closed``, else a copy of a random channel with probability ``p_copy`` (shift uniform in
    ±``max_shift`` pixels, rounded when ``integer_shifts``), else its own channel; at least one slot
    stays open. BN entries and conv weights are left as they are (a "trained" state, not a
    function-preserving one). Returns ``model``."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    for _, m in selective_modules(model):
        c = m.in_channels
        u = torch.rand(c, generator=g)
        closed = u < p_closed
        copy = (~closed) & (torch.rand(c, generator=g) < p_copy)
        if bool(closed.all()):
            closed[int(torch.randint(c, (1,), generator=g))] = False
        src = torch.randint(c, (c,), generator=g)
        shift = (torch.rand(c, 2, generator=g, dtype=torch.float64) * 2 - 1) * max_shift
        if integer_shifts:
            shift = shift.round()
        m.is_open.copy_((~closed).to(m.is_open.dtype))
        m.source.copy_(torch.where(copy, src, torch.full_like(src, -1)))
        m.shift.copy_(torch.where(copy.unsqueeze(1), shift, torch.zeros_like(shift)).to(m.shift.dtype))
        m.sync()
    return model
