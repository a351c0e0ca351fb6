"""Reductions: over the channel dimension they *reduce over channels* (a reader; the mask oracle
computes them on the kept channels only); over other dimensions they keep the channels."""
from __future__ import annotations

import torch

from graphsel.ops import channel as ch
from graphsel.ops.costs import per_input_element
from graphsel.ops.table import OpSpec, register_op
from graphsel.ops.targets import functions_named

_, _per_input = per_input_element(1)
_REDUCE = dict(cost=_per_input, category="reduce")
_NAMES = ("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod", "norm")

register_op([torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp, torch.prod,
             torch.norm] + list(_NAMES), OpSpec("reduce", ch.reduce_rule, **_REDUCE))
register_op([torch.max, torch.min, "max", "min"], OpSpec("max_min", ch.max_min_rule, **_REDUCE))
# same names elsewhere (torch.linalg.norm takes ord before dim) and index-valued reductions: costed only
register_op([f for f in functions_named(*_NAMES, "argmax", "argmin", "cumsum", "topk", "sort")
             if f not in (torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
                          torch.prod, torch.norm)] + ["argmax", "argmin", "cumsum", "topk", "sort"],
            OpSpec("reduce", **_REDUCE))
