"""The mask oracle: a graph's reference semantics under its channel masks.

It runs the original graph with every removed channel forced to zero at every position of its
class, the inputs of a consumer-masked conv/linear zeroed for that consumer only, and every op
that reduces over channels (LayerNorm / GroupNorm over the channels, softmax or mean over them)
computed on the kept channels only — through the operator table: a module is sliced with its
spec's ``slice`` rule, a function gets its per-channel arguments sliced and its spec's ``oracle``
hook fixes the rest. ``fold_masks`` and ``materialize`` are verified against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from graphsel.analysis.masks import ResolvedMasks, get_masks, resolve_masks
from graphsel.ir.graph import module_index
from graphsel.ops.channel import TensorVal
from graphsel.ops.table import spec_of, spec_of_module


@dataclass
class OraclePlan:
    """Per node: which outputs are zeroed (name or ``name#k`` -> channel dim, keep flags), which
    channel reductions run on the kept channels (-> dim, kept positions, keeps the channel dim),
    which consumers read masked inputs (-> dim, keep flags). Node names only: a plan is shared
    by the copies of one graph."""
    zero: dict[str, tuple[int, torch.Tensor]]
    reduce: dict[str, tuple[int, torch.Tensor, bool]]
    consumer: dict[str, tuple[int, torch.Tensor]]


def oracle_plan(gm: fx.GraphModule, resolved: ResolvedMasks) -> OraclePlan:
    a = resolved.analysis
    zero: dict[str, tuple[int, torch.Tensor]] = {}
    reduce: dict[str, tuple[int, torch.Tensor, bool]] = {}
    consumer: dict[str, tuple[int, torch.Tensor]] = {}
    if resolved.removed_classes:
        for name, k, t in a.channel_tensors():
            keep = resolved.keep_of(t)
            if not keep.all():
                zero[name if k is None else f"{name}#{k}"] = (t.dim, torch.from_numpy(keep))
        nodes = {n.name: n for n in gm.graph.nodes}
        for r in a.readers:
            if r.kind == "reduce":
                node = nodes[r.node]
                x = a.values[node.args[0].name] if node.args and isinstance(node.args[0], fx.Node) else None
                if isinstance(x, TensorVal) and x.has_channels:
                    keep = resolved.keep_of(x)
                    if not keep.all():
                        reduce[r.node] = (x.dim, torch.from_numpy(np.flatnonzero(keep)), r.keeps_channels)
    for r in a.readers:
        if r.node in resolved.consumer_keep:
            dim = 1 if r.kind == "conv_in" else -1
            consumer[r.node] = (dim, torch.from_numpy(resolved.consumer_keep[r.node]))
    return OraclePlan(zero, reduce, consumer)


class OracleInterpreter(fx.Interpreter):
    """Runs a graph under mask semantics; keeps node outputs in ``captured`` when ``capture`` is set."""

    def __init__(self, gm: fx.GraphModule, plan: OraclePlan, capture: bool = False):
        super().__init__(gm)
        self.plan = plan
        self.capture = capture
        self.captured: dict[str, torch.Tensor] = {}
        self.modules = module_index(gm)

    @staticmethod
    def _mask(t: torch.Tensor, dim: int, keep: torch.Tensor) -> torch.Tensor:
        shape = [1] * t.dim()
        shape[dim] = -1
        if t.is_floating_point():                   # a multiply is cheaper than a select (inputs are finite)
            return t * keep.to(device=t.device, dtype=t.dtype).view(shape)
        return torch.where(keep.to(t.device).view(shape), t, torch.zeros((), dtype=t.dtype, device=t.device))

    def run_node(self, n: fx.Node):
        plan = self.plan
        if n.name in plan.reduce:
            out = self._run_on_kept(n, *plan.reduce[n.name])
        elif n.name in plan.consumer:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            dim, keep = plan.consumer[n.name]
            args = (self._mask(args[0], dim, keep),) + tuple(args[1:])
            out = getattr(self, n.op)(n.target, args, kwargs)
        else:
            out = super().run_node(n)
        if n.name in plan.zero and isinstance(out, torch.Tensor):
            out = self._mask(out, *plan.zero[n.name])
        elif isinstance(out, (tuple, list)) and any(f"{n.name}#{k}" in plan.zero for k in range(len(out))):
            out = type(out)(self._mask(o, *plan.zero[f"{n.name}#{k}"]) if f"{n.name}#{k}" in plan.zero else o
                            for k, o in enumerate(out))
        if self.capture and isinstance(out, torch.Tensor):
            self.captured[n.name] = out.detach()
        return out

    def _run_on_kept(self, n: fx.Node, dim: int, keep: torch.Tensor, keeps_channels: bool):
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        c = x.shape[dim]
        keep = keep.to(x.device)
        xk = x.index_select(dim, keep)
        if n.op == "call_module":
            m = self.modules[n.target]
            spec = spec_of_module(m)
            if spec is not None and spec.slice is not None:
                m = spec.slice(m, {"chan": keep})
            out = m(xk, *args[1:], **kwargs)
        else:
            def kept(v):
                return v.index_select(0, keep) if isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == c else v
            rest = [kept(v) for v in args[1:]]
            kw = {key: kept(v) for key, v in kwargs.items()}
            spec = spec_of(n, self.modules)
            if spec is not None and spec.oracle is not None:
                rest, kw = spec.oracle(n, xk, rest, kw)
            out = n.target(xk, *rest, **kw) if n.op == "call_function" else getattr(xk, n.target)(*rest, **kw)
        if keeps_channels and isinstance(out, torch.Tensor) and out.dim() == x.dim() and out.shape[dim] == len(keep):
            full_shape = list(out.shape)
            full_shape[dim] = c
            return out.new_zeros(full_shape).index_copy(dim, keep, out)
        return out


def _plan_for(gm: fx.GraphModule, ctx=None) -> OraclePlan:
    if ctx is not None:
        return ctx.analysis("oracle_plan", gm, key=get_masks(gm).key())
    return oracle_plan(gm, resolve_masks(gm))


def oracle_interpreter(gm: fx.GraphModule, ctx=None) -> OracleInterpreter:
    """An interpreter that captures node outputs under mask semantics (``ctx``: a
    :class:`~graphsel.pipeline.context.PassContext` whose cache to use)."""
    return OracleInterpreter(gm, _plan_for(gm, ctx), capture=True)


def oracle_forward(gm: fx.GraphModule, inputs: tuple, ctx=None):
    """The graph's output under mask semantics (no grad handling: callers decide)."""
    return OracleInterpreter(gm, _plan_for(gm, ctx)).run(*inputs)
