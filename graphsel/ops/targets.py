"""Operator targets by name: the functions of that name in torch's namespaces (``torch``,
``torch.nn.functional``, ``operator``, ``torch.special``, ``torch.linalg``) and the tensor method of
that name, so that one spec covers every spelling (``F.relu``, ``torch.relu``, ``x.relu()``)."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F

NAMESPACES = (torch, F, operator, torch.special, torch.linalg)


def functions_named(*names: str) -> list[Any]:
    """Every function called ``name`` in :data:`NAMESPACES` (classes excluded), each once."""
    out: list[Any] = []
    seen: set[int] = set()
    for name in names:
        for ns in NAMESPACES:
            obj = getattr(ns, name, None)
            if obj is not None and callable(obj) and not isinstance(obj, type) and id(obj) not in seen:
                seen.add(id(obj))
                out.append(obj)
    return out


def named(*names: str) -> list[Any]:
    """:func:`functions_named` plus the method names themselves."""
    return functions_named(*names) + list(names)
