"""Cost analysis of a traced graph: parameters, MACs, other FLOPs, activation memory, sequential
depth and the distributed computation cost.

``graph_cost(gm)`` reads the shapes that :func:`graphsel.trace` records in
``node.meta["tensor_meta"]`` and costs every node with a rule; ``cost(model_or_gm, example_inputs)``
traces first when given a plain module. Models and inputs may live on the ``meta`` device, so the
cost of a model too large to run is computed without memory or time (:func:`meta_model` builds one).

Counting convention
-------------------
``.macs`` counts multiply-accumulates of the ops that torchvision's published figures count
(``weights.meta["_ops"]``, "GFLOPS" that are in fact GMACs, computed with a
``TorchDispatchMode`` counter over aten ``convolution``, ``mm``/``addmm``/``bmm`` and attention):

=======================================  =============================================================
op                                       MACs
=======================================  =============================================================
convolution (1-3d, grouped)              ``numel(out) · C_in/groups · prod(kernel)``
transposed convolution                   ``numel(in) · C_out/groups · prod(kernel)``
linear / ``F.linear`` / addmm            ``numel(out) · in_features``
matmul, ``@``, mm, bmm, baddbmm          ``numel(out) · contracted size`` (broadcast batch included)
einsum                                   ``numel(out) · prod(sizes of the summed letters)``
``F.scaled_dot_product_attention``       ``B·L·S·E + B·L·S·E_v`` (QKᵀ and AV)
``nn.MultiheadAttention``                in/out projections + QKᵀ + AV
``nn.Transformer*`` layers               the sum of their attention, linear and norm parts
torchvision's ``shifted_window_attention``  qkv + proj linears + windowed QKᵀ and AV
=======================================  =============================================================

Biases are not MACs. Everything else is reported separately in ``.other_flops``, approximately,
per output element unless noted: element-wise ops and activations 1, BatchNorm (eval, folded
scale and shift) 2, LayerNorm/GroupNorm/InstanceNorm 5, softmax 3, a bias add 1, max/avg pooling
``prod(kernel)``, global or adaptive pooling and reductions 1 per *input* element. Dropout is
costed as in eval mode (free). Views, shape ops, concatenation, padding and copies cost nothing
but the memory they allocate.

Parameters are counted once per unique tensor (shared modules and tied weights count once), and
attributed to the first node that reads them; ``.params`` is every parameter of the module as
given, ``.unused_params`` the part that no node reads (e.g. an auxiliary head skipped in eval).

Activation memory: ``.activation_bytes`` sums the outputs of every node that allocates (views,
in-place ops and the inputs excluded); ``.peak_activation_bytes`` is the largest total of live
tensors (inputs included) when the graph runs in node order and each tensor is freed after its
last use.

Layers, depth and distributed cost: a *layer* is a node with MACs > 0. ``.depth`` is the longest
path counted in layers (CIFAR ResNet-110: 110), ``.dag`` maps each layer to its nearest layer
predecessors, and :func:`distributed_cost` runs the greedy list scheduling of the budgeted
super-network paper on it.

The rules live in the operator table (``OpSpec.cost``, :mod:`graphsel.ops.costs`); a layer is
taught with ``graphsel.register_op``. Leaf modules and functions without a rule get 0 MACs (their
parameters are still counted) and are listed in ``CostReport.unknown``, never silently.
"""
from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from graphsel.errors import GraphselError
from graphsel.ir.graph import module_index
from graphsel.ir.shapes import propagate_shapes
from graphsel.ir.tracing import as_tuple, trace
from graphsel.ops.costs import UNKNOWN, OpCall, TensorArg
from graphsel.ops.table import spec_of, spec_of_module

__all__ = [
    "CostReport", "NodeCost", "UnknownCost", "OpCall", "TensorArg", "graph_cost", "cost", "distributed_cost",
    "meta_model", "CostError",
]


class CostError(GraphselError, ValueError):
    """The cost of a graph cannot be computed (no shapes, wrong argument types, ...)."""


# ================================================================================================
# results

@dataclass
class NodeCost:
    """The cost of one graph node.

    ``kind``: module class or function name; ``target``: module path or function; ``category``:
    conv, linear, matmul, attention, norm, pool, activation, elementwise, reduce, memory, view,
    scalar, module (a registered rule), unknown.
    """

    node: str
    kind: str
    params: int = 0
    macs: int = 0
    activation_bytes: int = 0
    other_flops: int = 0
    category: str = ""
    target: str = ""
    output_shape: tuple[int, ...] | None = None
    module_path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def output_numel(self) -> int:
        return math.prod(self.output_shape) if self.output_shape is not None else 0


@dataclass
class UnknownCost:
    """A node without a cost rule: counted as 0 MACs (parameters still counted)."""

    node: str
    target: str
    reason: str


@dataclass
class CostReport:
    """Totals and per-node rows of :func:`graph_cost` (see the module docstring for conventions)."""

    params: int
    macs: int
    activation_bytes: int = 0
    rows: list[NodeCost] = field(default_factory=list)
    other_flops: int = 0
    peak_activation_bytes: int = 0
    unused_params: int = 0
    depth: int = 0
    dag: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unknown: list[UnknownCost] = field(default_factory=list)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)

    # -- queries ---------------------------------------------------------------------------------
    def total(self, key: str, default_field: str = "macs") -> int:
        """Sum of ``key`` over rows: a NodeCost field, or an ``extra`` key such as ``"dense_macs"``
        (rows without that key contribute their ``default_field``, e.g. their plain MACs)."""
        if key in ("params", "macs", "other_flops", "activation_bytes"):
            return sum(getattr(r, key) for r in self.rows)
        return sum(r.extra.get(key, getattr(r, default_field)) for r in self.rows)

    def rows_of(self, category: str | Iterable[str]) -> list[NodeCost]:
        """The rows of one or several categories (``"conv"``, ``"norm"``, ...)."""
        cats = {category} if isinstance(category, str) else set(category)
        return [r for r in self.rows if r.category in cats]

    def by_module(self, depth: int = 1) -> dict[str, dict[str, int]]:
        """Totals per module path truncated to ``depth`` components (``""`` for nodes outside any
        submodule), in graph order: ``{path: {"params", "macs", "other_flops", "activation_bytes"}}``."""
        if depth < 1:
            raise ValueError(f"by_module: depth must be ≥ 1, got {depth}")
        out: dict[str, dict[str, int]] = {}
        for r in self.rows:
            key = ".".join(r.module_path.split(".")[:depth]) if r.module_path else ""
            agg = out.setdefault(key, {"params": 0, "macs": 0, "other_flops": 0, "activation_bytes": 0})
            agg["params"] += r.params
            agg["macs"] += r.macs
            agg["other_flops"] += r.other_flops
            agg["activation_bytes"] += r.activation_bytes
        return out

    # -- rendering ---------------------------------------------------------------------------------
    def summary(self) -> str:
        s = (f"params {_human(self.params)}, MACs {_human(self.macs)}, other FLOPs {_human(self.other_flops)}, "
             f"activations {_human(self.activation_bytes, 'B')} (peak {_human(self.peak_activation_bytes, 'B')}), "
             f"depth {self.depth} layers")
        if self.unused_params:
            s += f", {_human(self.unused_params)} params unused by the graph"
        if self.unknown:
            s += f"; {len(self.unknown)} node(s) without a cost rule: " + ", ".join(
                f"{u.node} ({u.target})" for u in self.unknown[:5]) + (" ..." if len(self.unknown) > 5 else "")
        return s

    __str__ = summary

    def table(self, top: int | None = None, tablefmt: str = "simple") -> str:
        """A tabulate table of the rows that cost anything, in graph order, or the ``top`` rows by
        MACs (then other FLOPs); extra keys from registered rules get their own columns."""
        from tabulate import tabulate

        rows = [r for r in self.rows if r.params or r.macs or r.other_flops or r.activation_bytes or r.extra]
        if top is not None:
            if top < 1:
                raise ValueError(f"table: top must be ≥ 1, got {top}")
            rows = sorted(rows, key=lambda r: (r.macs, r.other_flops, r.params), reverse=True)[:top]
        extra_keys: list[str] = []
        for r in self.rows:
            for k in r.extra:
                if k not in extra_keys:
                    extra_keys.append(k)
        headers = ["node", "op", "output", "params", "MACs", "other FLOPs", "act. bytes"] + extra_keys
        body = [[r.node, r.kind, "×".join(map(str, r.output_shape)) if r.output_shape else "",
                 _human(r.params), _human(r.macs), _human(r.other_flops), _human(r.activation_bytes, "B")]
                + [_fmt_extra(r.extra.get(k, "")) for k in extra_keys] for r in rows]
        body.append(["total", "", "", _human(self.params), _human(self.macs), _human(self.other_flops),
                     _human(self.activation_bytes, "B")]
                    + [_human(self.total(k)) if all(isinstance(r.extra.get(k, 0), (int, float)) for r in self.rows)
                       else "" for k in extra_keys])
        text = tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)
        notes = []
        if self.unknown:
            notes.append(f"{len(self.unknown)} node(s) without a cost rule (0 MACs): "
                         + "; ".join(f"{u.node}: {u.reason}" for u in self.unknown))
        if self.unused_params:
            notes.append(f"{_human(self.unused_params)} parameters are not used by the graph")
        return text + ("\n" + "\n".join(notes) if notes else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready totals (no rows)."""
        return {"params": self.params, "macs": self.macs, "other_flops": self.other_flops,
                "activation_bytes": self.activation_bytes, "peak_activation_bytes": self.peak_activation_bytes,
                "unused_params": self.unused_params, "depth": self.depth,
                "unknown": [u.__dict__ for u in self.unknown], "input_shapes": [list(s) for s in self.input_shapes]}


def _human(n: int | float, unit: str = "") -> str:
    if n == 0:
        return "0"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {suffix}{unit}".rstrip()
    return f"{n:g} {unit}".rstrip()


def _fmt_extra(v: Any) -> str:
    return _human(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


# ================================================================================================
# reading a node's shapes

def _tensor_metas(tm: Any) -> list[Any]:
    """All TensorMetadata in a node's (possibly nested) tensor_meta."""
    if tm is None:
        return []
    if hasattr(tm, "shape") and hasattr(tm, "dtype"):
        return [tm]
    if isinstance(tm, (list, tuple)):
        return [x for v in tm for x in _tensor_metas(v)]
    if isinstance(tm, dict):
        return [x for v in tm.values() for x in _tensor_metas(v)]
    return []


def _outputs(node: fx.Node) -> list[TensorArg]:
    return [TensorArg(tuple(int(d) for d in m.shape), m.dtype) for m in _tensor_metas(node.meta.get("tensor_meta"))]


def _substitute(v: Any, outs_of: Mapping[fx.Node, list[TensorArg]]) -> Any:
    """``v`` with graph nodes replaced by their TensorArg(s), or UNKNOWN for non-tensor values."""
    if isinstance(v, fx.Node):
        outs = outs_of[v] if v in outs_of else _outputs(v)
        if len(outs) == 1 and _is_single_tensor(v):
            return outs[0]
        return UNKNOWN if not outs else tuple(outs)
    if isinstance(v, (list, tuple)):
        items = [_substitute(x, outs_of) for x in v]
        return tuple(items) if isinstance(v, tuple) else items
    if isinstance(v, dict):
        return {k: _substitute(x, outs_of) for k, x in v.items()}
    return v


def _is_single_tensor(node: fx.Node) -> bool:
    tm = node.meta.get("tensor_meta")
    return tm is not None and hasattr(tm, "shape") and hasattr(tm, "dtype")


# ================================================================================================
# the graph walk

def _node_target_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_module":
        return str(t)
    if node.op == "call_method":
        return f".{t}()"
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


def _module_path_of(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        return last[0] if isinstance(last, tuple) else str(last)
    return ""


_INPLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv"}


def _is_inplace(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if (name.endswith("_") and not name.startswith("_")) or name in _INPLACE_OPERATORS:
        return True
    return bool(node.kwargs.get("inplace", False))


def _normalise(result: Any) -> tuple[int, int, dict[str, Any]]:
    if result is None:
        return 0, 0, {}
    if isinstance(result, dict):
        d = dict(result)
        macs = int(d.pop("macs", 0))
        other = int(d.pop("other_flops", 0))
        return macs, other, d
    if isinstance(result, (int, float)) and not isinstance(result, bool):
        return int(result), 0, {}
    raise CostError(f"a cost rule returned {type(result).__name__} ({result!r}); it must return the MACs as an "
                    f"int or a dict {{'macs': int, ...}}")


def _check_shapes(gm: fx.GraphModule) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # shape propagation (ShapeProp semantics) records meta["type"] on every node it ran and meta["tensor_meta"] on tensor results
    missing = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")
               and "tensor_meta" not in n.meta and "type" not in n.meta]
    has_any = any("tensor_meta" in n.meta for n in gm.graph.nodes if n.op != "output")
    if not has_any and (placeholders or missing):
        raise CostError(
            "the graph has no shape information (no node carries meta['tensor_meta']): trace it with "
            "graphsel.trace(model, example_inputs) or pass example_inputs to graphsel.cost(gm, example_inputs).")
    if missing:
        n = missing[0]
        raise CostError(
            f"node '{n.name}' ({_node_target_name(n)}) has no shape information (meta['tensor_meta']); the graph was "
            f"probably edited after shape propagation. Re-run graphsel.ir.shapes.propagate_shapes(gm, example_inputs) "
            f"or pass example_inputs to graphsel.cost.")


def _cost_node(node: fx.Node, modules: Mapping[str, nn.Module],
               outs_of: Mapping[fx.Node, list[TensorArg]]) -> tuple[NodeCost, UnknownCost | None]:
    """The row of one call node (parameters filled in by the caller) and, when it has no usable
    rule, the entry for ``CostReport.unknown``."""
    outs = outs_of[node]
    out_shape = outs[0].shape if outs else None
    row = NodeCost(node=node.name, kind="", target=_node_target_name(node), output_shape=out_shape,
                   module_path=_module_path_of(node))
    result, category, problem = None, "unknown", None
    if node.op == "call_module":
        m = modules[node.target]
        row.kind = type(m).__name__
        spec = spec_of_module(m)
        if spec is None or spec.cost is None:
            problem = UnknownCost(node.name, f"{type(m).__module__}.{type(m).__qualname__}",
                                  f"leaf module '{node.target}' ({type(m).__qualname__}) has no cost rule; "
                                  f"register one with graphsel.register_op({type(m).__qualname__}, OpSpec(cost=...))")
        else:
            rule, category = spec.cost, spec.category
            call = OpCall(node, _substitute(node.args, outs_of), _substitute(node.kwargs, outs_of), outs)
            in_shapes = [t.shape for t in call.tensors()]
            # a module without a tensor output has nothing to cost (registered rules still run)
            result = rule(m, in_shapes, out_shape) if out_shape is not None or category == "module" else {}
    else:
        row.kind = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
        spec = spec_of(node, modules)
        found = (spec.cost, spec.category) if spec is not None and spec.cost is not None else None
        if not outs and (found is None or found[1] != "module"):
            category = "scalar"  # shape arithmetic, asserts: no tensor, no cost
        elif found is None:
            problem = UnknownCost(node.name, row.target, f"{node.op} '{row.target}' has no cost rule; register "
                                                         f"one with graphsel.register_op(target, OpSpec(cost=...))")
        else:
            rule, category = found
            result = rule(OpCall(node, _substitute(node.args, outs_of), _substitute(node.kwargs, outs_of), outs))
    if result is None and category not in ("unknown", "scalar"):
        problem = UnknownCost(node.name, row.target, f"the {category} rule for '{row.target}' could not read the "
                                                     f"node's arguments (non-constant or missing)")
        category = "unknown"
    row.macs, row.other_flops, row.extra = _normalise(result)
    row.category = category
    return row, problem


def graph_cost(gm: fx.GraphModule, *, totals_only: bool = False) -> CostReport:
    """Cost of a shape-annotated GraphModule (see the module docstring). ``totals_only``: params,
    MACs, other FLOPs and the rows, without the memory and depth analyses (their fields stay 0)."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"graph_cost expects a torch.fx.GraphModule with shapes, got {type(gm).__name__}; "
                        f"use graphsel.cost(model, example_inputs) for a plain module.")
    _check_shapes(gm)
    nodes = list(gm.graph.nodes)
    seen_params: set[int] = set()
    rows: list[NodeCost] = []
    unknown: list[UnknownCost] = []
    category_of: dict[fx.Node, str] = {}
    row_of: dict[fx.Node, NodeCost] = {}
    params_by_attr: dict[str, nn.Parameter] = {}
    modules = module_index(gm)
    outs_of = {n: _outputs(n) for n in nodes}

    def attr_param(node: fx.Node):
        if node.op != "get_attr":
            return None
        if node.target not in params_by_attr:
            try:
                obj = gm.get_parameter(node.target)
            except AttributeError:
                obj = None
            params_by_attr[node.target] = obj
        return params_by_attr[node.target]

    def count_new(params: Iterable[torch.Tensor]) -> int:
        total = 0
        for p in params:
            if id(p) not in seen_params:
                seen_params.add(id(p))
                total += p.numel()
        return total

    for node in nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        row, problem = _cost_node(node, modules, outs_of)
        if problem is not None:
            unknown.append(problem)
        new_params = [p for a in node.all_input_nodes if (p := attr_param(a)) is not None]
        if node.op == "call_module":
            mod = modules[node.target]
            own = mod.parameters() if mod._modules else (t for t in mod._parameters.values() if t is not None)
            new_params = list(own) + new_params
        row.params = count_new(new_params)
        category_of[node] = row.category
        row_of[node] = row
        rows.append(row)

    # parameters: everything the module holds, counted once
    all_params = {id(t): t.numel() for m in modules.values() for t in m._parameters.values() if t is not None}
    total_params = sum(all_params.values())
    used = sum(n for i, n in all_params.items() if i in seen_params)

    if totals_only:
        return CostReport(params=total_params, macs=sum(r.macs for r in rows), rows=rows,
                          other_flops=sum(r.other_flops for r in rows), unused_params=total_params - used,
                          unknown=unknown)
    allocates = {n: _allocates(n, modules, category_of) for n in nodes}
    for node, row in row_of.items():
        if allocates[node]:
            row.activation_bytes = sum(o.nbytes for o in outs_of[node])
    peak = _peak_memory(nodes, allocates, outs_of)
    depth, dag = _layer_dag(nodes, row_of)
    input_shapes = [tuple(o.shape) for n in nodes if n.op == "placeholder" for o in outs_of[n]]
    return CostReport(params=total_params, macs=sum(r.macs for r in rows),
                      activation_bytes=sum(r.activation_bytes for r in rows), rows=rows,
                      other_flops=sum(r.other_flops for r in rows), peak_activation_bytes=peak,
                      unused_params=total_params - used, depth=depth, dag=dag, unknown=unknown,
                      input_shapes=input_shapes)


# -- memory ------------------------------------------------------------------------------------------

def _allocates(node: fx.Node, modules: Mapping[str, nn.Module], category_of: dict) -> bool:
    """Whether the node's output is new memory (not a view, not an in-place update, not a scalar)."""
    if node.op == "placeholder":
        return True
    if node.op not in ("call_module", "call_function", "call_method"):
        return False
    cat = category_of.get(node, "")
    if cat in ("view", "scalar"):                      # views alias their input
        return False
    if node.target is operator.getitem:  # basic indexing is a view; a tensor index gathers (copies)
        return _is_single_tensor(node.args[0]) and any(
            isinstance(a, fx.Node) and _is_single_tensor(a) for a in fx.node.map_arg(node.args[1:], lambda x: x)
            for a in ([a] if not isinstance(a, (list, tuple)) else a))
    return not _is_inplace(node, modules)


def _peak_memory(nodes: list[fx.Node], allocates: Mapping[fx.Node, bool],
                 outs_of: Mapping[fx.Node, list[TensorArg]]) -> int:
    """Largest total of live activations (inputs included, parameters excluded) in node order."""
    index = {n: i for i, n in enumerate(nodes)}
    root: dict[fx.Node, fx.Node | None] = {}
    size: dict[fx.Node, int] = {}
    for n in nodes:
        if allocates[n]:
            root[n] = n
            size[n] = sum(o.nbytes for o in outs_of[n])
        else:
            src = next((a for a in n.all_input_nodes if root.get(a) is not None), None)
            root[n] = root[src] if src is not None else None
    last_use: dict[fx.Node, int] = {}
    for n in nodes:
        r = root.get(n)
        if r is None:
            continue
        end = index[n]
        for u in n.users:
            end = max(end, len(nodes) if u.op == "output" else index[u])
        last_use[r] = max(last_use.get(r, 0), end)
    frees: dict[int, list[fx.Node]] = {}
    for r, i in last_use.items():
        frees.setdefault(i, []).append(r)
    live = peak = 0
    for i, n in enumerate(nodes):
        if root.get(n) is n:
            live += size[n]
        peak = max(peak, live)
        for r in frees.get(i, ()):
            live -= size[r]
    return peak


# -- depth and the layer DAG -----------------------------------------------------------------------

def _layer_dag(nodes: list[fx.Node], row_of: dict) -> tuple[int, dict[str, tuple[str, ...]]]:
    """Longest path in layers (nodes with MACs) and each layer's nearest layer predecessors."""
    index = {n: i for i, n in enumerate(nodes)}
    depth: dict[fx.Node, int] = {}
    nearest: dict[fx.Node, frozenset] = {}
    dag: dict[str, tuple[str, ...]] = {}
    best = 0
    for n in nodes:
        is_layer = n in row_of and row_of[n].macs > 0
        ins = n.all_input_nodes
        d = max((depth.get(a, 0) for a in ins), default=0) + (1 if is_layer else 0)
        depth[n] = d
        best = max(best, d)
        preds: set = set()
        for a in ins:
            if a in row_of and row_of[a].macs > 0:
                preds.add(a)
            else:
                preds |= nearest.get(a, frozenset())
        if is_layer:
            dag[n.name] = tuple(p.name for p in sorted(preds, key=index.__getitem__))
            nearest[n] = frozenset()
        else:
            nearest[n] = frozenset(preds)
    return best, dag


def distributed_cost(obj: fx.GraphModule | CostReport | Mapping[Any, Iterable[Any]], n_units: int) -> int:
    """Distributed computation cost (budgeted super networks, paper 004 fig. 8): the number of
    steps greedy list scheduling needs to run the layer DAG on ``n_units`` parallel units.

    Each step, walk the nodes in topological order and start every node whose predecessors all
    finished in earlier steps, while fewer than ``n_units`` have been started in this step; every
    node takes one step. ``obj`` is a shape-annotated GraphModule (its layers: nodes with MACs), a
    :class:`CostReport` (its ``dag``), or a mapping ``node -> predecessors`` in topological order.
    With ``n_units = 1`` the cost is the number of layers; with enough units it is the depth.
    A cycle, an unknown predecessor or ``n_units < 1`` raise :class:`CostError` (a ValueError).
    """
    if isinstance(n_units, bool) or not isinstance(n_units, int) or n_units < 1:
        raise CostError(f"distributed_cost: n_units must be a positive int, got {n_units!r}")
    if isinstance(obj, fx.GraphModule):
        dag: Mapping[Any, Iterable[Any]] = graph_cost(obj).dag
    elif isinstance(obj, CostReport):
        dag = obj.dag
    elif isinstance(obj, Mapping):
        dag = obj
    else:
        raise TypeError(f"distributed_cost expects a GraphModule, a CostReport or a mapping node -> predecessors, "
                        f"got {type(obj).__name__}")
    preds = {v: tuple(ps) for v, ps in dag.items()}
    for v, ps in preds.items():
        for p in ps:
            if p not in preds:
                raise CostError(f"distributed_cost: predecessor {p!r} of {v!r} is not a node of the DAG")
    remaining = list(preds)
    done: set = set()
    steps = 0
    while remaining:
        started = []
        for v in remaining:
            if len(started) == n_units:
                break
            if all(p in done for p in preds[v]):
                started.append(v)
        if not started:
            raise CostError(f"distributed_cost: the graph has a cycle through {remaining[:3]!r} (a DAG is needed)")
        done.update(started)
        started_set = set(started)
        remaining = [v for v in remaining if v not in started_set]
        steps += 1
    return steps


# ================================================================================================
# entry points

def cost(model_or_gm: nn.Module, example_inputs: Any = None) -> CostReport:
    """Cost of a model: traced with :func:`graphsel.trace` when a plain module (example inputs
    inferred for image classifiers when omitted), or a GraphModule as is (its shapes are
    re-propagated when ``example_inputs`` are given). Works with modules and inputs on the
    ``meta`` device. ``.params`` counts every parameter of ``model_or_gm``."""
    if not isinstance(model_or_gm, nn.Module):
        raise TypeError(f"graphsel.cost expects a torch.nn.Module or a GraphModule, got {type(model_or_gm).__name__}")
    if isinstance(model_or_gm, fx.GraphModule):
        if example_inputs is not None:
            propagate_shapes(model_or_gm, as_tuple(example_inputs))
        return graph_cost(model_or_gm)
    model = model_or_gm
    arity = len(as_tuple(example_inputs) or (None,))
    if _is_torch_leaf(model) and arity <= 3:
        # a bare torch.nn layer: its own forward may branch on arguments (ConvTranspose2d's
        # output_size); wrapped, it is one call_module node like anywhere else
        model = (_LayerAsModel, _LayerAsModel2, _LayerAsModel3)[arity - 1](model)
    gm = trace(model, example_inputs)
    report = graph_cost(gm)
    # parameters of the user's model that the graph does not use (e.g. aux heads skipped in eval)
    in_graph = {name for name, _ in gm.named_parameters()}
    seen: set[int] = set()
    extra = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name not in in_graph:
            extra += p.numel()
    report.params += extra
    report.unused_params += extra
    return report


class _LayerAsModel(nn.Module):
    """One torch.nn layer as a model (torch.fx cannot trace ``*args``: one class per arity)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class _LayerAsModel2(_LayerAsModel):
    def forward(self, x, y):
        return self.layer(x, y)


class _LayerAsModel3(_LayerAsModel):
    def forward(self, x, y, z):
        return self.layer(x, y, z)


def _is_torch_leaf(m: nn.Module) -> bool:
    """A torch.nn layer that torch.fx keeps as a leaf (containers are traced through)."""
    return (type(m).__module__.startswith(("torch.nn", "torch.ao.nn"))
            and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)))


@contextlib.contextmanager
def _parameters_on_meta():
    """Move every parameter and buffer to the meta device as modules register it."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def rp(self, name, param):
        register_parameter(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def rb(self, name, tensor, persistent=True):
        if tensor is not None and tensor.device.type != "meta":
            tensor = tensor.to("meta")
        register_buffer(self, name, tensor, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = rp, rb
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def meta_model(factory: Callable[..., nn.Module], *args, **kwargs) -> nn.Module:
    """Build ``factory(*args, **kwargs)`` with its parameters and buffers on the ``meta`` device
    (no memory, no initialisation time), for costing models too large to run.

    Tries ``with torch.device("meta")`` first; constructors that compute with tensors (torchvision's
    RegNet derives its widths with ``torch.arange(...).tolist()``) fail there, and are rebuilt on
    the CPU with each parameter and buffer moved to ``meta`` as it is registered.
    """
    try:
        with torch.device("meta"):
            model = factory(*args, **kwargs)
    except (NotImplementedError, RuntimeError):
        with _parameters_on_meta():
            model = factory(*args, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"meta_model: the factory returned {type(model).__name__}, not an nn.Module")
    return model.to("meta")
