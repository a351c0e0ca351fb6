"""An independent mask reference for real models: the original model, traced with plain
``torch.fx`` (not graphsel), run with every removed channel forced to zero wherever it travels.

Where a channel travels is followed here, on the concrete tensors, by rules written for this
test and nothing else: a requested source (a conv or linear layer named in the group masks)
starts its removed output positions; per-channel modules (norms, activations, pooling, dropout,
depthwise convolutions) and element-wise functions carry them; ``cat`` along channels offsets
them; ``flatten`` of a feature map turns channel p into the block of features p·H·W … (p+1)·H·W;
every other conv or linear layer reads them and starts its own. Anything else that receives a
removed position raises :class:`Unsupported`, so the models a test lists are covered exactly.
graphsel's channel analysis, masks and oracle are not involved.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

_CARRY_MODULES = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish,
                  nn.Hardsigmoid, nn.Sigmoid, nn.Dropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                  nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_CARRY_FUNCTIONS = {operator.add, operator.iadd, operator.mul, operator.imul, torch.add, torch.mul, F.relu,
                    torch.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid, torch.sigmoid, F.dropout,
                    F.adaptive_avg_pool2d, F.max_pool2d, F.avg_pool2d, torch.mean}
_CARRY_METHODS = {"add", "add_", "mul", "mul_", "relu", "relu_", "sigmoid", "mean", "contiguous"}


class Unsupported(Exception):
    """A removed channel reaches an operation these rules do not know."""


def _stochastic_depth():
    try:
        from torchvision.ops import stochastic_depth
        return {stochastic_depth}
    except ImportError:  # pragma: no cover
        return set()


_CARRY_FUNCTIONS |= _stochastic_depth()


class ZeroedReference(fx.Interpreter):
    """``ZeroedReference(model, removed).run(x)``: ``model``'s output with the output positions
    ``removed[source]`` of every named conv/linear source, and everything they reach, forced to zero."""

    def __init__(self, model: nn.Module, removed: dict[str, set[int]]):
        super().__init__(fx.symbolic_trace(model))
        self.removed = {k: frozenset(v) for k, v in removed.items() if v}
        self.positions: dict[fx.Node, frozenset[int]] = {}
        self.started: set[str] = set()

    def run(self, *args):
        out = super().run(*args)
        missing = set(self.removed) - self.started
        assert not missing, f"masks name modules the model never called as producers: {sorted(missing)}"
        return out

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        removed = self._follow(n, out)
        self.positions[n] = removed
        if removed and isinstance(out, torch.Tensor):
            out = out.clone()
            out[:, sorted(removed)] = 0
        return out

    def _inputs(self, n: fx.Node) -> list[tuple[fx.Node, frozenset[int]]]:
        return [(a, self.positions.get(a, frozenset())) for a in n.all_input_nodes]

    def _follow(self, n: fx.Node, out) -> frozenset[int]:
        inputs = self._inputs(n)
        incoming = frozenset().union(*(r for _, r in inputs)) if inputs else frozenset()
        if n.op == "call_module":
            m = self.module.get_submodule(n.target)
            if isinstance(m, nn.Linear) and isinstance(out, torch.Tensor) and out.dim() > 2:
                raise Unsupported(f"Linear '{n.target}' on a {out.dim()}-d tensor (channels last)")
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                depthwise = isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels == m.out_channels
                if depthwise:
                    return incoming
                if n.target in self.removed:
                    self.started.add(n.target)
                return self.removed.get(n.target, frozenset())     # reads its input, starts its own
            if isinstance(m, _CARRY_MODULES):
                return incoming
            if isinstance(m, nn.Flatten):
                return self._flatten(n, incoming)
            if incoming:
                raise Unsupported(f"module {type(m).__name__} at '{n.target}'")
            return frozenset()
        if n.op in ("call_function", "call_method"):
            target = n.target
            if not incoming:
                return frozenset()
            if n.op == "call_function" and target in _CARRY_FUNCTIONS or n.op == "call_method" and target in _CARRY_METHODS:
                if target in (torch.mean, "mean") and not self._spatial_reduction(n):
                    raise Unsupported(f"mean over channels at {n.name}")
                # broadcast operands of size 1 along channels (spatial attention maps) carry nothing
                return frozenset().union(*(r for a, r in inputs if isinstance(self.env.get(a), torch.Tensor)
                                           and self.env[a].dim() > 1 and isinstance(out, torch.Tensor)
                                           and self.env[a].shape[1] == out.shape[1]))
            if target in (torch.cat, torch.concat):
                return self._cat(n)
            if target is torch.flatten or target in ("flatten", "view", "reshape"):
                return self._flatten(n, incoming)
            raise Unsupported(f"{n.op} {getattr(target, '__name__', target)} at {n.name}")
        return frozenset()

    def _spatial_reduction(self, n: fx.Node) -> bool:
        dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        return bool(dims) and all(d not in (1, -3) for d in dims)

    def _cat(self, n: fx.Node) -> frozenset[int]:
        tensors = n.args[0]
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
        if dim != 1:
            raise Unsupported(f"cat along dim {dim} at {n.name}")
        out, offset = set(), 0
        for t in tensors:
            out |= {offset + p for p in self.positions.get(t, frozenset())}
            offset += self.env[t].shape[1]
        return frozenset(out)

    def _flatten(self, n: fx.Node, incoming: frozenset[int]) -> frozenset[int]:
        x = self.env[n.all_input_nodes[0]]
        if x.dim() == 2:
            return incoming
        if x.dim() != 4:
            raise Unsupported(f"flatten of a {x.dim()}-d tensor at {n.name}")
        per = x.shape[2] * x.shape[3]
        return frozenset(p * per + k for p in incoming for k in range(per))


def zeroed_reference(model: nn.Module, removed: dict[str, set[int]], x: torch.Tensor) -> torch.Tensor:
    """The output of ``model`` on ``x`` with the channels ``removed`` names forced to zero (eval, no grad)."""
    with torch.no_grad():
        return ZeroedReference(model.eval(), removed).run(x)
