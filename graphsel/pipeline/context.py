"""The pass context: example inputs, verification inputs and the one analysis cache of a pipeline.

Analyses (module index, costs, channel groups, resolved masks, the oracle's plan, ...) are
computed on demand with ``ctx.analysis(name, gm, key=...)`` and cached under the graph's
**version** (``graphsel_meta(gm).version``) and the key. Copies of a graph share its version, so a
result computed on one is reused by the copies the pipeline makes; a graph that changes gets a new
version — the pipeline gives one to the result of every pass that changed the graph, a pass
object called outside a pipeline does the same when its result says ``modified``, and code that
edits a graph by hand calls ``ctx.invalidate(gm)``.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
import torch.fx as fx

from graphsel.analysis.channels import analyze_channels
from graphsel.analysis.cost import graph_cost
from graphsel.analysis.masks import get_masks, resolve_masks
from graphsel.ir.meta import InputSpec, graphsel_meta, new_version
from graphsel.ir.tracing import example_inputs_of
from graphsel.pipeline.oracle import oracle_plan

_ANALYSES: dict[str, Callable[[fx.GraphModule, "PassContext"], Any]] = {}


def register_analysis(name: str):
    """Decorator: register ``fn(gm, ctx) -> value`` as the analysis ``name``."""
    def deco(fn):
        _ANALYSES[name] = fn
        return fn
    return deco


def graph_version(gm: fx.GraphModule) -> int:
    return graphsel_meta(gm).version


class PassContext:
    """State shared by the passes of one pipeline run."""

    def __init__(self, example_inputs: tuple | None = None, *, n_random_inputs: int = 2, seed: int = 0):
        self.example_inputs = tuple(example_inputs) if example_inputs is not None else None
        self.n_random_inputs = n_random_inputs
        self.seed = seed
        self._cache: dict[tuple[str, int, Any], Any] = {}
        self._verify_inputs: list[tuple] | None = None
        self.check_finite = False           # refuse non-finite outputs of a graph before a pass

    @classmethod
    def for_graph(cls, gm: fx.GraphModule, **kw) -> "PassContext":
        return cls(example_inputs_of(gm), **kw)

    # -- analyses -------------------------------------------------------------------------
    def analysis(self, name: str, gm: fx.GraphModule, key: Any = None) -> Any:
        """The analysis ``name`` of ``gm`` (``key``: what else it depends on, e.g. the masks),
        cached while the graph's version is unchanged."""
        fn = _ANALYSES.get(name)
        if fn is None:
            raise KeyError(f"unknown analysis '{name}'; registered: {', '.join(sorted(_ANALYSES))}")
        k = (name, graph_version(gm), key)
        if k not in self._cache:
            self._cache[k] = fn(gm, self)
        return self._cache[k]

    def cached(self, name: str, gm: fx.GraphModule, key: Any = None) -> Any:
        """The cached analysis ``name`` of ``gm``, or None (nothing is computed)."""
        return self._cache.get((name, graph_version(gm), key))

    def store(self, name: str, gm: fx.GraphModule, value: Any, key: Any = None) -> None:
        """Record ``value`` as the analysis ``name`` of ``gm`` (a pass that just computed it)."""
        self._cache[(name, graph_version(gm), key)] = value

    def invalidate(self, gm: fx.GraphModule | None = None) -> None:
        """``gm`` changed: give it a new version (its cached analyses no longer apply). Without
        ``gm``: drop every cached analysis."""
        if gm is None:
            self._cache.clear()
        else:
            graphsel_meta(gm).version = new_version()

    # -- inputs ---------------------------------------------------------------------------
    def verify_inputs(self) -> list[tuple]:
        """The example inputs plus ``n_random_inputs`` random inputs of the same shapes and dtypes."""
        if self._verify_inputs is None:
            if self.example_inputs is None:
                self._verify_inputs = []
            else:
                g = torch.Generator().manual_seed(self.seed)
                out = [self.example_inputs]
                floats = all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in self.example_inputs)
                for _ in range(self.n_random_inputs if floats else 0):
                    out.append(tuple(InputSpec.of(t).make(g, t.device) for t in self.example_inputs))
                self._verify_inputs = out
        return self._verify_inputs


# -- built-in analyses ------------------------------------------------------------------------

@register_analysis("modules")
def modules_by_type(gm: fx.GraphModule, ctx: PassContext) -> dict[type, list[tuple[str, str]]]:
    """``{module class: [(path, node name), ...]}`` over the call_module nodes."""
    index: dict[type, list[tuple[str, str]]] = defaultdict(list)
    for n in gm.graph.nodes:
        if n.op == "call_module":
            index[type(gm.get_submodule(n.target))].append((n.target, n.name))
    return dict(index)


@register_analysis("cost")
def _cost(gm: fx.GraphModule, ctx: PassContext):
    return graph_cost(gm)


@register_analysis("cost_totals")
def _cost_totals(gm: fx.GraphModule, ctx: PassContext):
    """Params, MACs and other FLOPs without the memory and depth analyses (history rows)."""
    return graph_cost(gm, totals_only=True)


@register_analysis("channels")
def _channels(gm: fx.GraphModule, ctx: PassContext):
    return analyze_channels(gm)


@register_analysis("resolved_masks")
def _resolved_masks(gm: fx.GraphModule, ctx: PassContext):
    """``gm``'s masks on its channel analysis (ask with ``key=get_masks(gm).key()``)."""
    return resolve_masks(gm, analysis=ctx.analysis("channels", gm))


@register_analysis("oracle_plan")
def _oracle_plan(gm: fx.GraphModule, ctx: PassContext):
    """The mask oracle's per-node plan for ``gm``'s masks (ask with ``key=get_masks(gm).key()``)."""
    return oracle_plan(gm, ctx.analysis("resolved_masks", gm, key=get_masks(gm).key()))
