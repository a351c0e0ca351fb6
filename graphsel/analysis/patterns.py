"""Patterns over fx graphs, written as data: ``Pattern(nn.BatchNorm2d, RELU, Optional(DROPOUT), nn.Conv2d)``.

* Module elements match with ``isinstance`` (so ``timm``'s ``BatchNormAct2d`` matches
  ``nn.BatchNorm2d``); torch.fx's ``SubgraphMatcher`` compares module names and matches none.
* Op families come from the operator table (``OpSpec.families``) and accept every spelling:
  module (``nn.ReLU``), function (``F.relu``, ``torch.relu``), method (``x.relu()``) and in-place
  variants (``F.relu(inplace=True)``, ``x.relu_()``).
* A chain ``a → b → c`` requires each interior node to feed the next as its first argument and,
  by default, to have that single user.
* ``where=predicate(match) -> bool | str`` adds a condition (a string is the failure reason).
* Matching is anchored at the chain's last node, and every failure has a reason
  (:class:`FailedMatch`) that passes turn into diagnostics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch.fx as fx
import torch.nn as nn

from graphsel.ops.table import registered, table_version


@dataclass(frozen=True)
class Op:
    """An op family: module classes (``isinstance``), free functions, and tensor method names."""
    name: str
    modules: tuple[type, ...] = ()
    functions: tuple[Any, ...] = ()
    methods: tuple[str, ...] = ()

    def matches(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        if node.op == "call_module":
            if not self.modules:
                return False
            try:
                return isinstance(gm.get_submodule(node.target), self.modules)
            except AttributeError:
                return False
        if node.op == "call_function":
            return any(node.target is f for f in self.functions)
        if node.op == "call_method":
            return node.target in self.methods
        return False

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Optional:
    """A chain element that may be absent."""
    element: Any


class Family(Op):
    """An op family of the operator table: every module class, function and method whose
    ``OpSpec.families`` names it (looked up when matching, so later registrations count)."""

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_cached", (-1, (), (), ()))

    def _members(self) -> tuple[tuple, tuple, tuple]:
        version = table_version()
        if self._cached[0] != version:
            table = registered()
            pick = lambda d: tuple(t for t, spec in d.items() if self.name in spec.families)
            object.__setattr__(self, "_cached", (version, pick(table["modules"]), pick(table["functions"]),
                                                 pick(table["methods"])))
        return self._cached[1:]

    @property
    def modules(self):
        return self._members()[0]

    @property
    def functions(self):
        return self._members()[1]

    @property
    def methods(self):
        return self._members()[2]

    def __eq__(self, other):
        return isinstance(other, Family) and other.name == self.name

    def __hash__(self):
        return hash(("family", self.name))

    def __repr__(self) -> str:
        return f"Family({self.name!r})"


RELU, RELU6, HARDSWISH, SILU, GELU, SIGMOID, DROPOUT = (Family(n) for n in (
    "relu", "relu6", "hardswish", "silu", "gelu", "sigmoid", "dropout"))
BATCHNORM, BATCHNORM2D, CONV, CONV2D, LINEAR = (Family(n) for n in (
    "batch_norm", "batch_norm_2d", "conv", "conv2d", "linear"))
ADD, MUL, CAT = Family("add"), Family("mul"), Family("cat")


def families() -> dict[str, Family]:
    """Every pattern family named by a spec of the operator table."""
    names = {f for table in registered().values() for spec in table.values() for f in spec.families}
    return {n: Family(n) for n in sorted(names)}


def as_op(element: Any) -> Op:
    """An :class:`Op` from a module class, a family name, a function, an Op, or a tuple of
    alternatives (``(nn.Conv2d, nn.Linear)``)."""
    if isinstance(element, Op):
        return element
    if isinstance(element, type) and issubclass(element, nn.Module):
        return Op(element.__name__, (element,))
    if isinstance(element, str):
        known = families()
        if element in known:
            return known[element]
        raise ValueError(f"unknown op family '{element}'; known: {', '.join(known)}")
    if isinstance(element, tuple) and element:
        ops = [as_op(e) for e in element]
        return Op("|".join(o.name for o in ops), tuple(c for o in ops for c in o.modules),
                  tuple(f for o in ops for f in o.functions), tuple(m for o in ops for m in o.methods))
    if callable(element):
        return Op(getattr(element, "__name__", str(element)), (), (element,))
    raise TypeError(f"cannot use {element!r} as a pattern element")


class FailedMatch:
    """A falsy match result that says why."""
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"FailedMatch({self.reason!r})"


@dataclass
class Match:
    """A matched chain: ``nodes[i]`` matched the i-th *present* element ``ops[i]``."""
    nodes: list[fx.Node]
    ops: list[Op]
    gm: fx.GraphModule = field(repr=False)

    @property
    def root(self) -> fx.Node:
        return self.nodes[-1]

    def node(self, op: Any) -> fx.Node | None:
        """The matched node for an element (family name, Op or module class), or None if absent."""
        target = as_op(op)
        for n, o in zip(self.nodes, self.ops):
            if o == target or o.name == target.name:
                return n
        return None

    def module(self, op: Any) -> nn.Module | None:
        n = self.node(op)
        if n is None or n.op != "call_module":
            return None
        return self.gm.get_submodule(n.target)

    def modules(self) -> list[nn.Module | None]:
        return [self.gm.get_submodule(n.target) if n.op == "call_module" else None for n in self.nodes]


def first_input(node: fx.Node) -> fx.Node | None:
    """The first argument of a node if it is a node (the data input of unary ops)."""
    if node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    if "input" in node.kwargs and isinstance(node.kwargs["input"], fx.Node):
        return node.kwargs["input"]
    return None


def describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"'{node.target}'"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}() at {node.name}"
    if node.op == "call_method":
        return f".{node.target}() at {node.name}"
    return f"{node.op} {node.name}"


class Pattern:
    """A chain of elements, matched backwards from its last node (see the module docstring)."""

    def __init__(self, *elements: Any, single_user: bool = True,
                 where: Callable[[Match], bool | str] | None = None, name: str | None = None):
        if not elements:
            raise ValueError("a Pattern needs at least one element")
        self.elements = [Optional(as_op(e.element)) if isinstance(e, Optional) else as_op(e) for e in elements]
        if isinstance(self.elements[-1], Optional):
            raise ValueError("the last element of a Pattern cannot be Optional")
        self.single_user = single_user
        self.where = where
        self.name = name or " → ".join(
            (f"[{e.element}]" if isinstance(e, Optional) else str(e)) for e in self.elements)

    def match(self, node: fx.Node, gm: fx.GraphModule) -> Match | FailedMatch:
        """Match the chain ending at ``node``."""
        last = self.elements[-1]
        if not last.matches(node, gm):
            return FailedMatch(f"{describe(node)} is not {last}")
        nodes, ops = [node], [last]
        cur = node
        for el in reversed(self.elements[:-1]):
            prev = first_input(cur)
            optional = isinstance(el, Optional)
            op = el.element if optional else el
            if prev is None or not op.matches(prev, gm):
                if optional:
                    continue
                what = describe(prev) if prev is not None else "no node"
                return FailedMatch(f"the input of {describe(cur)} is {what}, not {op}")
            if self.single_user and len(prev.users) != 1:
                users = ", ".join(describe(u) for u in prev.users)
                return FailedMatch(f"{describe(prev)} ({op}) feeds {len(prev.users)} nodes ({users}), "
                                   f"not only {describe(cur)}")
            nodes.insert(0, prev)
            ops.insert(0, op)
            cur = prev
        m = Match(nodes, ops, gm)
        if self.where is not None:
            ok = self.where(m)
            if ok is not True:
                return FailedMatch(ok if isinstance(ok, str) else f"condition of {self.name} not met")
        return m

    def find(self, gm: fx.GraphModule, failures: list[tuple[fx.Node, str]] | None = None) -> list[Match]:
        """All matches in graph order. Anchors (nodes matching the last element) that fail are
        appended to ``failures`` as ``(node, reason)``."""
        out = []
        last = self.elements[-1]
        for n in gm.graph.nodes:
            if not last.matches(n, gm):
                continue
            m = self.match(n, gm)
            if m:
                out.append(m)
            elif failures is not None:
                failures.append((n, m.reason))
        return out

    def __repr__(self) -> str:
        return f"Pattern({self.name})"


def find_patterns(gm: fx.GraphModule, patterns: Sequence[Pattern]) -> list[Match]:
    """Matches of several patterns, longest first, without two matches sharing a node."""
    taken: set[fx.Node] = set()
    out = []
    for p in sorted(patterns, key=lambda p: -len(p.elements)):
        for m in p.find(gm):
            if taken.isdisjoint(m.nodes):
                out.append(m)
                taken.update(m.nodes)
    return out
