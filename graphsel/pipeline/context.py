"""The pass context: example inputs, verification inputs and cached analyses.

Analyses (shapes, module index, costs, channel groups, ...) are computed on demand with
``ctx.analysis(name, gm)`` and cached under a structural fingerprint of the graph (node names,
ops, targets, arguments and the parameter shapes of called modules), so a cached result is
reused across the copies the pipeline makes and recomputed as soon as a pass edits the graph.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from graphsel.ir.graph import module_index
from graphsel.ir.meta import InputSpec

_ANALYSES: dict[str, Callable[[fx.GraphModule, "PassContext"], Any]] = {}


def register_analysis(name: str):
    """Decorator: register ``fn(gm, ctx) -> value`` as the analysis ``name``."""
    def deco(fn):
        _ANALYSES[name] = fn
        return fn
    return deco


def graph_fingerprint(gm: fx.GraphModule, modules: dict[str, nn.Module] | None = None) -> int:
    """A hash that changes whenever the graph or the shape of a called module changes.
    ``modules``: ``module_index(gm)``, when the caller has it."""
    modules = module_index(gm) if modules is None else modules
    items = []
    for n in gm.graph.nodes:
        extra: tuple = ()
        if n.op == "call_module":
            m = modules.get(n.target)
            if m is None:
                extra = ("<missing>",)
            elif m._modules:
                extra = (type(m).__name__,) + tuple(tuple(p.shape) for p in m.parameters(recurse=True))
            else:
                extra = (type(m).__name__,) + tuple(tuple(p.shape) for p in m._parameters.values() if p is not None)
        items.append((n.name, n.op, str(n.target), repr(n.args), repr(n.kwargs), extra))
    return hash(tuple(items))


class PassContext:
    """State shared by the passes of one pipeline run."""

    def __init__(self, example_inputs: tuple | None = None, *, n_random_inputs: int = 2, seed: int = 0,
                 options: dict[str, Any] | None = None):
        self.example_inputs = tuple(example_inputs) if example_inputs is not None else None
        self.n_random_inputs = n_random_inputs
        self.seed = seed
        self.options = dict(options or {})
        self._cache: dict[tuple[str, int], Any] = {}
        self._verify_inputs: list[tuple] | None = None

    @classmethod
    def for_graph(cls, gm: fx.GraphModule, **kw) -> "PassContext":
        from graphsel.ir.tracing import example_inputs_of
        return cls(example_inputs_of(gm), **kw)

    # -- analyses -------------------------------------------------------------------------
    def analysis(self, name: str, gm: fx.GraphModule, *, fingerprint: int | None = None) -> Any:
        """The analysis ``name`` of ``gm`` (cached while the graph is unchanged). ``fingerprint``:
        ``graph_fingerprint(gm)``, when the caller has just computed it."""
        if name not in _ANALYSES:
            _load_builtin_analyses()
        if name not in _ANALYSES:
            raise KeyError(f"unknown analysis '{name}'; registered: {', '.join(sorted(_ANALYSES))}")
        key = (name, graph_fingerprint(gm) if fingerprint is None else fingerprint)
        if key not in self._cache:
            self._cache[key] = _ANALYSES[name](gm, self)
        return self._cache[key]

    def invalidate(self) -> None:
        """Drop every cached analysis."""
        self._cache.clear()

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


def _load_builtin_analyses() -> None:
    from graphsel.pipeline import analyses  # noqa: F401
