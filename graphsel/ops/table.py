"""The operator table: everything graphsel knows about one operator, in one :class:`OpSpec`.

A spec is looked up for every call node — by module class (most specific class of the module's
MRO first), by function object, by tensor-method name, or by a function's or class's qualified
name (``"torchvision.ops.stochastic_depth.stochastic_depth"``: known libraries without importing
them). The channel analysis, the cost model, materialize, the mask oracle and the pattern
families all dispatch through it; an operator without a spec is a barrier to the channel
analysis and a reported unknown to the cost model, never a silent pass-through.

``register_op(target, spec)`` is the one extension point (see ``graphsel.ops`` for a worked
example); a module class registered with a channel rule is also traced as one node (a leaf).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch.fx as fx
import torch.nn as nn

from graphsel.ir.tracing import register_leaf_module


@dataclass(frozen=True)
class OpSpec:
    """What graphsel knows about one operator (or family of operators).

    * ``channels(cx, node, target, args, kwargs) -> value``: how channel ids flow through the op
      (``graphsel.ops.channel`` holds the building blocks: :func:`~graphsel.ops.channel.per_channel`,
      :func:`~graphsel.ops.channel.elementwise`, ...). ``None``: the op is a barrier for channels
      reaching it (it still runs on plain tensors).
    * ``cost``: for a module ``cost(module, input_shapes, output_shape)``, for a function or
      method ``cost(call: OpCall)``; returns the MACs or ``{"macs": ..., "other_flops": ...,
      **extra}``; ``None`` (with ``category`` left ``"unknown"``): reported as unknown.
    * ``category``: the cost category (conv, linear, norm, activation, view, memory, ...).
    * ``params``: for a module, its per-channel parameters and buffers (names, dimension 0) that
      the channel rule :func:`~graphsel.ops.channel.per_channel` records and the default
      ``slice`` slices.
    * ``slice(module, parts) -> module``: a new module keeping, per slot (``"in"``, ``"out"``,
      ``"chan"``), the positions ``parts[slot]`` (a LongTensor); materialize and the mask oracle
      call it. Default for modules with ``params``: slice those tensors along dimension 0.
    * ``rewrite(mx, node, x, out)``: for a shape op, rewrite the node's size arguments after its
      input lost channels (materialize).
    * ``oracle(node, x_kept, rest, kwargs) -> (rest, kwargs)``: for a function computing a channel
      reduction, its other arguments for the kept channels only (the mask oracle runs the op on
      the kept channels, with module parameters sliced by ``slice`` and 1-d arguments of the
      channel count sliced; this hook fixes the rest, e.g. F.layer_norm's normalized_shape).
    * ``chain``: a per-channel, single-input op that materialize may place a gather in front of.
    * ``moves``: the op only moves elements (view, permute, split, indexing): channel counts in
      its size arguments are allowed when they are its input's own (the analysis follows them).
    * ``families``: pattern families the op belongs to (``graphsel.analysis.patterns``).
    """

    name: str
    channels: Callable | None = None
    cost: Callable | None = None
    category: str = "unknown"
    params: tuple[str, ...] = ()
    slice: Callable | None = None
    rewrite: Callable | None = None
    oracle: Callable | None = None
    chain: bool = False
    moves: bool = False
    families: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"OpSpec.name must be a non-empty string, got {self.name!r}")
        for attr in ("channels", "cost", "slice", "rewrite", "oracle"):
            v = getattr(self, attr)
            if v is not None and not callable(v):
                raise TypeError(f"OpSpec({self.name!r}).{attr} must be callable or None, got {v!r}")
        if isinstance(self.params, str) or not all(isinstance(p, str) for p in self.params):
            raise TypeError(f"OpSpec({self.name!r}).params must be a tuple of attribute names, got {self.params!r}")
        if isinstance(self.families, str):
            object.__setattr__(self, "families", (self.families,))


@dataclass
class _Table:
    modules: dict[type, OpSpec] = field(default_factory=dict)
    functions: dict[Any, OpSpec] = field(default_factory=dict)
    methods: dict[str, OpSpec] = field(default_factory=dict)
    qualnames: dict[str, OpSpec] = field(default_factory=dict)
    version: int = 0                          # bumped by every registration (caches below follow it)
    by_type: dict[type, OpSpec | None] = field(default_factory=dict)


_TABLE = _Table()


def register_op(target: type | Callable | str | Iterable, spec: OpSpec) -> OpSpec:
    """Teach graphsel an operator: ``target`` is a module class, a function (a ``call_function``
    target, e.g. one wrapped with ``torch.fx.wrap``), a tensor-method name (``"relu"``), a
    ``"package.module.qualname"`` string naming a function or class without importing it, or a
    list of those. Registering a target again replaces its spec; a spec for a subclass wins over
    one for its base. Returns ``spec`` (usable as a decorator helper)."""
    if not isinstance(spec, OpSpec):
        raise TypeError(f"register_op: spec must be a graphsel.OpSpec, got {type(spec).__name__}")
    targets = list(target) if isinstance(target, (list, tuple, set, frozenset)) else [target]
    if not targets:
        raise ValueError("register_op: no target given")
    for t in targets:
        if isinstance(t, type):
            if not issubclass(t, nn.Module):
                raise TypeError(f"register_op: a class target must be an nn.Module subclass, got {t!r}")
            _TABLE.modules[t] = spec
            if spec.channels is not None and not t.__module__.startswith("torch.nn"):
                register_leaf_module(t)          # traced as one node, so that its channel rule applies
        elif isinstance(t, str):
            if not t or not all(part.isidentifier() for part in t.split(".")):
                raise ValueError(f"register_op: {t!r} is neither a method name nor a dotted qualified name")
            (_TABLE.qualnames if "." in t else _TABLE.methods)[t] = spec
            if "." in t and spec.channels is not None:
                register_leaf_module(t)          # (when it names a module class) traced as one node
        elif callable(t):
            try:
                _TABLE.functions[t] = spec
            except TypeError:
                raise TypeError(f"register_op: function target {t!r} is not hashable") from None
        else:
            raise TypeError(f"register_op: cannot register {t!r}: give a module class, a function, a method "
                            f"name or a qualified name")
    _TABLE.version += 1
    _TABLE.by_type.clear()
    return spec


def unregister_op(target: type | Callable | str) -> None:
    """Remove ``target``'s own spec (tests and experiments; built-ins come back on the next import)."""
    for table in (_TABLE.modules, _TABLE.functions, _TABLE.methods, _TABLE.qualnames):
        try:
            table.pop(target, None)
        except TypeError:
            pass
    _TABLE.version += 1
    _TABLE.by_type.clear()


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"


def spec_of_module(m: nn.Module | type) -> OpSpec | None:
    """The spec of a module (by its class's MRO, most specific first), or None."""
    cls = m if isinstance(m, type) else type(m)
    hit = _TABLE.by_type.get(cls, _MISSING)
    if hit is _MISSING:
        hit = None
        for klass in cls.__mro__:
            hit = _TABLE.modules.get(klass) or _TABLE.qualnames.get(_qualname(klass))
            if hit is not None:
                break
        _TABLE.by_type[cls] = hit
    return hit


def spec_of_function(fn: Any) -> OpSpec | None:
    try:
        hit = _TABLE.functions.get(fn)
    except TypeError:               # an unhashable call target
        return None
    if hit is None and _TABLE.qualnames:
        hit = _TABLE.qualnames.get(_qualname(fn))
    return hit


def spec_of_method(name: str) -> OpSpec | None:
    return _TABLE.methods.get(name)


def spec_of(node: fx.Node, modules: dict[str, nn.Module]) -> OpSpec | None:
    """The spec of a call node (``modules``: ``module_index(gm)``), or None."""
    if node.op == "call_module":
        return spec_of_module(modules[node.target])
    if node.op == "call_function":
        return spec_of_function(node.target)
    if node.op == "call_method":
        return spec_of_method(node.target)
    return None


def table_version() -> int:
    """Changes whenever a spec is registered (for caches derived from the table)."""
    return _TABLE.version


def registered() -> dict[str, dict]:
    """A copy of the table: ``{"modules", "functions", "methods", "qualnames"}``."""
    return {"modules": dict(_TABLE.modules), "functions": dict(_TABLE.functions),
            "methods": dict(_TABLE.methods), "qualnames": dict(_TABLE.qualnames)}


def describe_target(t: Any) -> str:
    if isinstance(t, type):
        return t.__qualname__
    if isinstance(t, str):
        return t if "." in t else f".{t}()"
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)


_MISSING = object()
