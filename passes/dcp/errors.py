"""The error DCP raises on bad input (a :class:`graphsel.GraphselError`, and a ``ValueError`` for
callers that catch that): every message says what is wrong and how to fix it."""
from __future__ import annotations

from graphsel.errors import GraphselError


class DCPError(GraphselError, ValueError):
    """Bad input to discrimination-aware channel pruning: no or malformed data, a ratio outside
    [0, 1), a model without residual blocks under ``scope="block_internal"``, a model whose output
    is not a batch of class logits."""
