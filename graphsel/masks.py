"""Channel masks and the reference oracle (placeholder until the channel compiler lands)."""
from __future__ import annotations

import torch.fx as fx

from .meta import graphsel_meta


def has_masks(gm: fx.GraphModule) -> bool:
    meta = graphsel_meta(gm, create=False)
    return bool(meta is not None and meta.masks)


def oracle_forward(gm, inputs):
    raise NotImplementedError


def oracle_interpreter(gm):
    raise NotImplementedError
