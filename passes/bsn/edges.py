"""The edges of a super network on a traced graph: which residual branches and blocks can be
gated, and how gates depend on one another.

* :func:`residual_branches` — every residual add ``y = s + F(x)`` and which operand is the branch
  ``F`` (found on the graph and its channel analysis, never by module names);
* :func:`module_region` / :func:`block_candidates` — the nodes a module computes, its single
  output, and the composite modules whose output is summed with other edges (fabric connections);
* :class:`GateGraph` — the graph as index arrays with its gates: which nodes an architecture
  (gate values, one row per sample) keeps, the wiring that makes gated-off edges exactly zero.

A node is **kept** by an architecture when it is *alive* (reached from a source of the graph — a
placeholder, a parameter read, a constant — along edges whose gates are on) and it *reaches the
output* the same way. Gated-off edges and everything they disconnect are exactly zero in the
gated forward (see :mod:`.gate`), so removing the nodes that are not kept leaves the function
unchanged: the cost model counts kept nodes, the extraction keeps them.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from graphsel.ir.graph import module_index
from graphsel.ir.shapes import tensor_shape
from graphsel.ops.table import spec_of_module

from .gate import Gate

#: add spellings whose two operands are summed element-wise: ``a + b``, ``a += b``, ``torch.add(a, b)``,
#: ``a.add(b)``, ``a.add_(b)``
ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_")
INPLACE_ADDS = (operator.iadd,)


def is_add(node: fx.Node) -> bool:
    """An element-wise sum of two tensors without scaling (``alpha``) or ``out=``."""
    if node.op == "call_function" and node.target in ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in ADD_METHODS:
        pass
    else:
        return False
    return (len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args))


def is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` writes into its first argument."""
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (name.endswith("_") and not name.startswith("_")) or node.target in INPLACE_ADDS or \
            name in ("iadd", "isub", "imul", "itruediv") or bool(node.kwargs.get("inplace", False))
    return False


def gate_of(node: fx.Node, modules: dict[str, nn.Module]) -> Gate | None:
    if node.op == "call_module":
        m = modules.get(node.target)
        if isinstance(m, Gate):
            return m
    return None


def module_stack(node: fx.Node) -> list[str]:
    """The module paths enclosing ``node`` (outermost first), from torch.fx's ``nn_module_stack``."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for v in stack.values():
        out.append(v[0] if isinstance(v, tuple) else str(v))
    if node.op == "call_module" and (not out or out[-1] != node.target):
        out.append(str(node.target))
    return out


def _bits(mask: int):
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


# ------------------------------------------------------------------------------------------------
# the graph as arrays

class _Index:
    def __init__(self, gm: fx.GraphModule):
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.inputs = [[self.pos[a] for a in n.all_input_nodes] for n in self.nodes]
        self.users = [[self.pos[u] for u in n.users] for n in self.nodes]
        self._anc: list[int] | None = None

    @property
    def ancestors(self) -> list[int]:
        """Per node, the bitset of its ancestors (itself excluded)."""
        if self._anc is None:
            anc = []
            for i, ins in enumerate(self.inputs):
                m = 0
                for j in ins:
                    m |= anc[j] | (1 << j)
                anc.append(m)
            self._anc = anc
        return self._anc


# ------------------------------------------------------------------------------------------------
# residual branches

@dataclass
class ResidualBranch:
    """``add = shortcut + branch`` with ``branch`` the output of the residual function."""
    add: fx.Node
    branch: fx.Node
    shortcut: fx.Node
    nodes: list[fx.Node]             # the branch's own nodes (removed with it)
    layers: int                      # of which, channel sources / modules with parameters
    module: str                      # the innermost module holding all of them ('' for the root)
    projection: bool                 # the shortcut has layers of its own (a projection)


def _common_module(nodes: list[fx.Node]) -> str:
    stacks = [module_stack(n) for n in nodes]
    stacks = [s for s in stacks if s] or [[]]
    common = stacks[0]
    for s in stacks[1:]:
        k = 0
        while k < min(len(common), len(s)) and common[k] == s[k]:
            k += 1
        common = common[:k]
    return common[-1] if common else ""


def residual_branches(gm: fx.GraphModule, analysis: Any = None) -> tuple[list[ResidualBranch], list[tuple[str, str]]]:
    """Every residual add of ``gm`` and its branch; plus ``(node, why not)`` for adds that are not.

    An add ``a + b`` (module docstring of :mod:`.edges` lists the spellings) is residual when both
    operands have the add's shape (no broadcasting), share an ancestor that depends on the model's
    input (the fork ``x``), and one operand is a *branch*: the nodes only it depends on (not the
    other operand) hold at least one layer, feed nothing but the branch itself — so removing
    the branch removes exactly those nodes — and read one tensor from outside (the branch is a
    function ``F(x)`` of the fork). The shortcut is the other operand: the fork itself
    (identity) or its own small computation (a projection, a zero-padded subsampling); when both
    operands qualify the one with more layers is the branch, and equal ones are reported (two
    parallel branches: gate them as blocks or by path). Layers are the channel sources of the
    channel analysis (convolutions, linear layers) and opaque modules with parameters.
    """
    idx = _Index(gm)
    anc = idx.ancestors
    modules = module_index(gm)
    nodes = idx.nodes
    data = 0                                 # nodes that depend on a placeholder (or are one)
    for i, n in enumerate(nodes):
        if n.op == "placeholder" or any((data >> j) & 1 for j in idx.inputs[i]):
            data |= 1 << i
    sources = set(getattr(analysis, "sources", {}) or {}) if analysis is not None else set()

    def is_layer(n: fx.Node) -> bool:
        # a channel source of the analysis (conv, linear, ...), or an opaque module with weights
        if n.name in sources and n.op != "placeholder":
            return True
        if n.op == "call_module":
            m = modules.get(n.target)
            if m is None or isinstance(m, Gate) or not any(True for _ in m.parameters()):
                return False
            spec = spec_of_module(m)
            return spec is None or spec.channels is None
        return False

    found: list[ResidualBranch] = []
    skipped: list[tuple[str, str]] = []
    for i, v in enumerate(nodes):
        if not is_add(v):
            continue
        a, b = v.args
        out, sa, sb = tensor_shape(v), tensor_shape(a), tensor_shape(b)
        if out is None or sa is None or sb is None:
            skipped.append((v.name, "operands without recorded tensor shapes"))
            continue
        if not (tuple(sa) == tuple(sb) == tuple(out)):
            skipped.append((v.name, f"operands of shapes {tuple(sa)} and {tuple(sb)} are broadcast"))
            continue
        ia, ib = idx.pos[a], idx.pos[b]
        full_a, full_b = anc[ia] | (1 << ia), anc[ib] | (1 << ib)
        if not (full_a & full_b & data):
            skipped.append((v.name, "the operands share no input-dependent ancestor (not a residual fork)"))
            continue
        cand = []
        for op, own, other in ((a, full_a & ~full_b, b), (b, full_b & ~full_a, a)):
            if not own:
                continue
            members = [nodes[j] for j in _bits(own)]
            member_set = set(members)
            owned = all(u in member_set or u is v for m in members for u in m.users)
            entries = {a for m in members for a in m.all_input_nodes
                       if a not in member_set and (a.op == "placeholder" or a.all_input_nodes)}
            layers = sum(1 for m in members if is_layer(m))
            cand.append((op, other, members, owned and len(entries) == 1, layers))
        branches = [c for c in cand if c[3] and c[4] > 0]
        if not branches:
            why = ("no operand is a branch: "
                   + ("; ".join(f"'{c[0].name}' " + ("is not a function of one tensor computed only for this sum"
                                                      if not c[3] else "has no layer")
                                for c in cand) or "one operand is an ancestor of the other and has no layers"))
            skipped.append((v.name, why))
            continue
        if len(branches) == 2 and branches[0][4] == branches[1][4]:
            skipped.append((v.name, f"two parallel branches of {branches[0][4]} layer(s) each: not a residual "
                                    f"branch and a shortcut (gate them with on='blocks' or by module path)"))
            continue
        op, other, members, _, layers = max(branches, key=lambda c: c[4])
        if gate_of(op, modules) is not None:
            skipped.append((v.name, f"the branch '{op.name}' is gated already"))
            continue
        projection = any(c[0] is other and c[4] > 0 for c in cand)
        found.append(ResidualBranch(v, op, other, members, layers, _common_module(members), projection))
    return found, skipped


# ------------------------------------------------------------------------------------------------
# blocks and module paths

@dataclass
class Region:
    """The nodes a module computes in the graph and its single output node."""
    path: str
    nodes: list[fx.Node]
    output: fx.Node | None
    problem: str | None = None


def module_region(gm: fx.GraphModule, path: str, idx: _Index | None = None) -> Region:
    """The nodes of module ``path`` (a leaf called once, or a traced-through module whose nodes
    carry it in their ``nn_module_stack``) and its output: the one node whose value leaves it."""
    nodes = list(gm.graph.nodes)
    inside = [n for n in nodes if n.op == "call_module" and n.target == path]
    if not inside:
        inside = [n for n in nodes if n.op not in ("placeholder", "output") and path in module_stack(n)]
    if not inside:
        return Region(path, [], None, "is not called in the traced graph")
    members = set(inside)
    exits = [n for n in inside if any(u not in members for u in n.users)]
    if len(exits) != 1:
        return Region(path, inside, None,
                      "has no output used outside it" if not exits else
                      f"has {len(exits)} outputs used outside it (called at several places, or returning "
                      f"several tensors): {', '.join(e.name for e in exits[:4])}")
    return Region(path, inside, exits[0])


def is_cut(gm: fx.GraphModule, region: set[fx.Node]) -> bool:
    """Whether every path from the model's inputs to its output passes through ``region``."""
    nodes = list(gm.graph.nodes)
    reached: set[fx.Node] = set()
    for n in nodes:
        if n in region:
            continue
        if n.op == "placeholder" or any(a in reached for a in n.all_input_nodes):
            reached.add(n)
    out = next(n for n in reversed(nodes) if n.op == "output")
    return out not in reached


def module_classes(gm: fx.GraphModule) -> dict[str, type]:
    """The original class of every module the graph calls or traces through, from the nodes'
    ``nn_module_stack`` (a GraphModule keeps leaves as they are but rebuilds the modules around
    them as plain ``nn.Module`` s: ``nn.Sequential`` containers are no longer recognisable)."""
    out: dict[str, type] = {}
    for n in gm.graph.nodes:
        for v in (n.meta.get("nn_module_stack") or {}).values():
            if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], type):
                out.setdefault(v[0], v[1])
    for path, m in module_index(gm).items():
        if path and not m._modules:
            out.setdefault(path, type(m))
    return out


def block_candidates(gm: fx.GraphModule) -> tuple[list[Region], list[tuple[str, str]]]:
    """Composite modules that are edges of a super network: elements of a container
    (``nn.Sequential``, or a module that is only indexed, never called: ``nn.ModuleList``,
    ``nn.ModuleDict``), not leaves, holding at least one
    layer, with one output that is an operand of an element-wise sum, and not a cut of the graph
    (some input → output path avoids them). The outermost qualifying module wins."""
    modules = module_index(gm)
    classes = module_classes(gm)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    found: list[Region] = []
    skipped: list[tuple[str, str]] = []
    taken: list[str] = []
    for path, m in modules.items():
        if not path or path in called or not m._modules or path not in classes:
            continue
        if "." not in path:
            continue
        parent = classes.get(path.rpartition(".")[0], nn.ModuleList)   # never called: indexed, a container
        if not issubclass(parent, containers):
            continue
        if any(path.startswith(t + ".") for t in taken):
            continue
        if not any(True for _ in m.parameters()):
            continue
        r = module_region(gm, path)
        if r.problem is not None:
            skipped.append((path, r.problem))
            continue
        if not any(is_add(u) for u in r.output.users):
            skipped.append((path, "its output is not summed with other edges"))
            continue
        if is_cut(gm, set(r.nodes)):
            skipped.append((path, "every input → output path passes through it: turning it off would disconnect "
                                  "the network (for residual blocks use on='residual')"))
            continue
        found.append(r)
        taken.append(path)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found.sort(key=lambda r: order[r.output])
    return found, skipped


# ------------------------------------------------------------------------------------------------
# gates in the graph: wiring and kept nodes

class GateGraph:
    """``gm`` as index arrays with its gate nodes (columns in graph order, :attr:`gate_names`).

    :meth:`kept` evaluates architectures: for gate values ``H`` (S × G booleans, one row per
    sample), the nodes each keeps (S × N). :meth:`wire` stores in every gate what its effective
    value depends on (``free`` / ``upstream``), the same rule evaluated in the forward.
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.index = _Index(gm)
        self.modules = module_index(gm)
        nodes = self.index.nodes
        self.nodes = nodes
        self.gate_nodes: list[int] = []
        self.gate_names: list[str] = []
        self.gate_modules: list[Gate] = []
        seen: dict[int, str] = {}
        self.column = np.full(len(nodes), -1, dtype=np.int64)
        for i, n in enumerate(nodes):
            g = gate_of(n, self.modules)
            if g is None:
                continue
            if id(g) in seen:
                raise ValueError(f"gate '{n.target}' is called at several places; every gate gates one edge")
            if len(n.all_input_nodes) != 1:
                raise ValueError(f"gate '{n.target}' (node {n.name}) must have exactly one tensor input")
            seen[id(g)] = n.target
            self.column[i] = len(self.gate_nodes)
            self.gate_nodes.append(i)
            self.gate_names.append(str(n.target))
            self.gate_modules.append(g)
        self.output = next(i for i in range(len(nodes) - 1, -1, -1) if nodes[i].op == "output")

    @property
    def n_gates(self) -> int:
        return len(self.gate_nodes)

    def eval_values(self) -> np.ndarray:
        """The eval-mode gate values as one architecture (1 × G)."""
        return np.array([[g.is_on for g in self.gate_modules]], dtype=bool).reshape(1, self.n_gates)

    def last_values(self) -> np.ndarray:
        """The gate values of the last forward (S × G): the training draws, per sample."""
        cols = []
        for name, g in zip(self.gate_names, self.gate_modules):
            if g.last_h is None:
                raise RuntimeError(f"gate '{name}' has not run yet: call the model first")
            cols.append(g.last_h.detach().reshape(-1).to("cpu", torch.bool).numpy())
        if not cols:
            return np.zeros((1, 0), dtype=bool)
        n = max(len(c) for c in cols)
        return np.stack([np.broadcast_to(c, (n,)) for c in cols], axis=1)

    def alive(self, H: np.ndarray) -> np.ndarray:
        """N × S: whether each node is reached from a source along edges whose gates are on."""
        H = self._check(H)
        s = H.shape[0]
        out = np.zeros((len(self.nodes), s), dtype=bool)
        for i, ins in enumerate(self.index.inputs):
            if not ins:
                out[i] = True
            elif self.column[i] >= 0:
                out[i] = out[ins[0]] & H[:, self.column[i]]
            elif len(ins) == 1:
                out[i] = out[ins[0]]
            else:
                out[i] = out[ins].any(axis=0)
        return out

    def kept(self, H: np.ndarray) -> np.ndarray:
        """N × S: alive and reaching the output along edges whose gates are on."""
        H = self._check(H)
        alive = self.alive(H)
        reach = np.zeros_like(alive)
        reach[self.output] = True
        users, column = self.index.users, self.column
        for i in range(len(self.nodes) - 1, -1, -1):
            if i == self.output:
                continue
            acc = None
            for u in users[i]:
                r = reach[u] if column[u] < 0 else reach[u] & H[:, column[u]]
                acc = r.copy() if acc is None else (acc | r)
            if acc is not None:
                reach[i] = acc
        return alive & reach

    def _check(self, H: np.ndarray) -> np.ndarray:
        H = np.asarray(H, dtype=bool)
        if H.ndim == 1:
            H = H[None, :]
        if H.ndim != 2 or H.shape[1] != self.n_gates:
            raise ValueError(f"gate values must be S × {self.n_gates} booleans, got shape {H.shape}")
        return H

    def wiring(self) -> list[tuple[bool, list[int]]]:
        """Per gate column: (its input is reached from a source without crossing a gate, the columns
        of the nearest gates upstream of its input)."""
        free: list[bool] = []
        near: list[frozenset] = []
        for i, ins in enumerate(self.index.inputs):
            if self.column[i] >= 0:
                free.append(False)
                near.append(frozenset([int(self.column[i])]))
            elif not ins:
                free.append(True)
                near.append(frozenset())
            else:
                free.append(any(free[j] for j in ins))
                near.append(frozenset().union(*(near[j] for j in ins)))
        out = []
        for i in self.gate_nodes:
            src = self.index.inputs[i][0]
            out.append((free[src], sorted(near[src]) if not free[src] else []))
        return out

    def wire(self) -> None:
        """Store the wiring in the gates (called by the passes after every change of the graph)."""
        for g, (free, up) in zip(self.gate_modules, self.wiring()):
            g.free = free
            g.upstream = tuple(self.gate_modules[c] for c in up)


def wire_gates(gm: fx.GraphModule) -> int:
    """Recompute and store every gate's wiring; returns the number of gates."""
    gg = GateGraph(gm)
    gg.wire()
    return gg.n_gates
