"""Cost analysis (placeholder API; the full model is being written): params and MACs per node."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn


@dataclass
class NodeCost:
    node: str
    kind: str
    params: int = 0
    macs: int = 0
    activation_bytes: int = 0


@dataclass
class CostReport:
    params: int
    macs: int
    activation_bytes: int = 0
    rows: list[NodeCost] = field(default_factory=list)


def graph_cost(gm: fx.GraphModule) -> CostReport:
    rows = []
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        m = gm.get_submodule(n.target)
        tm = n.meta.get("tensor_meta")
        macs = 0
        if isinstance(m, nn.Conv2d) and tm is not None:
            macs = tm.shape.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear) and tm is not None:
            macs = tm.shape.numel() * m.in_features
        rows.append(NodeCost(n.name, type(m).__name__, 0, int(macs)))
    params = sum(p.numel() for p in gm.parameters())
    return CostReport(params, sum(r.macs for r in rows), 0, rows)


def cost(model_or_gm: nn.Module, example_inputs: Any = None) -> CostReport:
    from .tracing import trace
    gm = model_or_gm if isinstance(model_or_gm, fx.GraphModule) and example_inputs is None else trace(model_or_gm, example_inputs)
    return graph_cost(gm)
