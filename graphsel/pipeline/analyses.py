"""Built-in analyses, available through ``ctx.analysis(name, gm)``:

* ``"modules"``: module-type index, ``{class: [(path, node_name), ...]}`` over call_module nodes;
* ``"cost"``: :class:`graphsel.analysis.cost.CostReport` of the graph (needs shapes);
* ``"cost_totals"``: the same without the memory and depth analyses (the pipeline's history rows);
* ``"channels"``: :class:`graphsel.analysis.channels.ChannelAnalysis` (channel groups, needs shapes).
"""
from __future__ import annotations

from collections import defaultdict

import torch.fx as fx

from graphsel.pipeline.context import register_analysis


@register_analysis("modules")
def module_index(gm: fx.GraphModule, ctx) -> dict[type, list[tuple[str, str]]]:
    index: dict[type, list[tuple[str, str]]] = defaultdict(list)
    for n in gm.graph.nodes:
        if n.op == "call_module":
            index[type(gm.get_submodule(n.target))].append((n.target, n.name))
    return dict(index)


@register_analysis("cost")
def cost_analysis(gm: fx.GraphModule, ctx):
    from graphsel.analysis.cost import graph_cost
    return graph_cost(gm)


@register_analysis("cost_totals")
def cost_totals_analysis(gm: fx.GraphModule, ctx):
    from graphsel.analysis.cost import graph_cost
    return graph_cost(gm, totals_only=True)


@register_analysis("channels")
def channel_analysis(gm: fx.GraphModule, ctx):
    from graphsel.analysis.channels import analyze_channels
    return analyze_channels(gm)
