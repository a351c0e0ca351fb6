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

Extending: :func:`register_module_cost` for leaf modules (graphsel's own trainable modules),
:func:`register_function_cost` for functions and tensor methods. Leaf modules and functions
without a rule get 0 MACs (their parameters are still counted) and are listed in
``CostReport.unknown``, never silently.
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
import torch.nn.functional as F

from graphsel.ir.graph import module_index
from graphsel.errors import GraphselError

__all__ = [
    "CostReport", "NodeCost", "UnknownCost", "OpCall", "TensorArg", "graph_cost", "cost", "distributed_cost",
    "register_module_cost", "register_function_cost", "meta_model", "CostError",
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
# op descriptions handed to rules

@dataclass(frozen=True)
class TensorArg:
    """A tensor argument or output of a node, as its recorded shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


class _Unknown:
    """A non-constant, non-tensor argument (e.g. a traced ``x.size(0)``)."""

    def __repr__(self):
        return "<unknown>"


UNKNOWN = _Unknown()


@dataclass
class OpCall:
    """What a function rule sees: the node's arguments with tensors replaced by :class:`TensorArg`
    (other traced values by ``UNKNOWN``) and its outputs."""

    node: fx.Node
    args: tuple
    kwargs: dict
    outputs: list[TensorArg]

    @property
    def out(self) -> TensorArg | None:
        return self.outputs[0] if self.outputs else None

    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """Positional argument ``index`` or keyword ``name``."""
        if index < len(self.args):
            return self.args[index]
        if name is not None and name in self.kwargs:
            return self.kwargs[name]
        return default

    def tensors(self) -> list[TensorArg]:
        """Tensor arguments in order (positional, then keyword; nested lists flattened)."""
        found: list[TensorArg] = []

        def walk(v):
            if isinstance(v, TensorArg):
                found.append(v)
            elif isinstance(v, (list, tuple)):
                for x in v:
                    walk(x)
            elif isinstance(v, dict):
                for x in v.values():
                    walk(x)
        walk(self.args)
        walk(self.kwargs)
        return found


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize if hasattr(dtype, "itemsize") else torch.empty((), dtype=dtype).element_size()


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
# rule registries

ModuleRule = Callable[[nn.Module, list, tuple], "int | dict"]
FunctionRule = Callable[[OpCall], "int | dict"]

_MODULE_RULES: dict[type, tuple[ModuleRule, str]] = {}
_FUNCTION_RULES: dict[Any, tuple[FunctionRule, str]] = {}   # by function object
_METHOD_RULES: dict[str, tuple[FunctionRule, str]] = {}     # by tensor method name
_QUALNAME_RULES: dict[str, tuple[FunctionRule, str]] = {}   # by "module.function" (lazy, no import)
_QUALNAME_MODULE_RULES: dict[str, tuple[ModuleRule, str]] = {}  # by "module.Class" (lazy, no import)


def register_module_cost(cls: type, fn: ModuleRule, *, category: str = "module") -> None:
    """Cost rule for a leaf module class (e.g. graphsel's dynamic group or selective convolutions).

    ``fn(module, input_shapes: list[tuple[int, ...]], output_shape: tuple[int, ...]) -> int | dict``
    returns the MACs, or ``{"macs": int, **extra}``; ``"other_flops"`` is read as such, other keys
    (e.g. ``"dense_macs"``) are kept on the row as ``row.extra`` and shown by
    :meth:`CostReport.table`. ``input_shapes`` are the shapes of the node's tensor arguments in
    order, ``output_shape`` the shape of its first tensor output. Dispatch is by ``isinstance``,
    most specific class first (a rule for a subclass wins over one for its base); registering a
    class again replaces its rule. Parameters are counted automatically.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_module_cost expects an nn.Module subclass, got {cls!r}")
    if not callable(fn):
        raise TypeError(f"register_module_cost: the rule for {cls.__name__} must be callable, got {fn!r}")
    _MODULE_RULES[cls] = (fn, category)


def register_function_cost(target: Callable | str, fn: FunctionRule, *, category: str = "module") -> None:
    """Cost rule for a function (``call_function`` target, e.g. one wrapped with ``torch.fx.wrap``)
    or, given a string, a tensor method name (``call_method``). ``fn(call: OpCall) -> int | dict``
    as for :func:`register_module_cost`."""
    if not callable(fn):
        raise TypeError(f"register_function_cost: rule must be callable, got {fn!r}")
    if isinstance(target, str):
        _METHOD_RULES[target] = (fn, category)
    elif callable(target):
        _FUNCTION_RULES[target] = (fn, category)
    else:
        raise TypeError(f"register_function_cost: target must be a function or a method name, got {target!r}")


def _module_rule(m: nn.Module) -> tuple[ModuleRule, str] | None:
    for klass in type(m).__mro__:
        if klass in _MODULE_RULES:
            return _MODULE_RULES[klass]
        hit = _QUALNAME_MODULE_RULES.get(f"{klass.__module__}.{klass.__qualname__}")
        if hit is not None:
            return hit
    return None


def _function_rule(node: fx.Node) -> tuple[FunctionRule, str] | None:
    t = node.target
    if node.op == "call_method":
        return _METHOD_RULES.get(t)
    try:
        hit = _FUNCTION_RULES.get(t)
    except TypeError:  # unhashable target
        hit = None
    if hit is None:
        qual = f"{getattr(t, '__module__', '')}.{getattr(t, '__name__', '')}"
        hit = _QUALNAME_RULES.get(qual)
    return hit


# ================================================================================================
# built-in rules

def _ntuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (int(v),) * n


def _spatial_dims(m: nn.Module, default: int = 2) -> int:
    name = type(m).__name__
    for d in (1, 2, 3):
        if f"{d}d" in name:
            return d
    return default


# -- convolution / linear ----------------------------------------------------------------------

def _conv_macs(in_shape, out_shape, weight_shape, transposed: bool, groups: int) -> int:
    # weight: (C_out, C_in/groups, *k) for conv, (C_in, C_out/groups, *k) for transposed conv
    k = math.prod(weight_shape[2:])
    if transposed:
        return math.prod(in_shape) * weight_shape[1] * k
    return math.prod(out_shape) * weight_shape[1] * k


def _conv_module(m, ins, out):
    w = tuple(m.weight.shape)
    d = {"macs": _conv_macs(ins[0], out, w, m.transposed, m.groups)}
    if m.bias is not None:
        d["other_flops"] = math.prod(out)
    return d


def _linear_module(m, ins, out):
    d = {"macs": math.prod(out) * m.in_features}
    if m.bias is not None:
        d["other_flops"] = math.prod(out)
    return d


def _bilinear_module(m, ins, out):
    return {"macs": math.prod(out) * m.in1_features * m.in2_features,
            "other_flops": math.prod(out) if m.bias is not None else 0}


def _conv_function(call: OpCall):
    x, w = call.arg(0, "input"), call.arg(1, "weight")
    if not isinstance(x, TensorArg) or not isinstance(w, TensorArg) or call.out is None:
        return None
    name = getattr(call.node.target, "__name__", "")
    transposed = "transpose" in name
    d = {"macs": _conv_macs(x.shape, call.out.shape, w.shape, transposed, 1)}
    if isinstance(call.arg(2, "bias"), TensorArg):
        d["other_flops"] = call.out.numel
    return d


def _linear_function(call: OpCall):
    w = call.arg(1, "weight")
    if not isinstance(w, TensorArg) or call.out is None:
        return None
    d = {"macs": call.out.numel * w.shape[-1]}
    if isinstance(call.arg(2, "bias"), TensorArg):
        d["other_flops"] = call.out.numel
    return d


def _matmul_function(call: OpCall):
    """matmul, mm, bmm, @: numel(out) × contracted size (the last dim of the first operand)."""
    a = call.arg(0, "input")
    if call.out is None or not isinstance(a, TensorArg) or not a.shape:
        return None
    return {"macs": call.out.numel * a.shape[-1]}


def _addmm_function(call: OpCall):
    """addmm(bias, a, b), baddbmm(bias, a, b): MACs of a @ b; the add is an other FLOP."""
    a = call.arg(1, "mat1")
    if a is None:
        a = call.kwargs.get("batch1")
    if call.out is None or not isinstance(a, TensorArg):
        return None
    return {"macs": call.out.numel * a.shape[-1], "other_flops": call.out.numel}


def _einsum_function(call: OpCall):
    eq = call.arg(0, "equation")
    ops = call.tensors()
    if not isinstance(eq, str) or call.out is None or not ops:
        return None
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ops):
        return None
    sizes: dict[str, int] = {}
    for term, t in zip(terms, ops):
        letters = [c for c in term if c.isalpha()]
        if "..." in term:  # letters align from both ends around the ellipsis
            head, tail = term.split("...")
            for c, s in zip(head, t.shape):
                sizes[c] = s
            for c, s in zip(reversed(tail), reversed(t.shape)):
                sizes[c] = s
        else:
            for c, s in zip(letters, t.shape):
                sizes[c] = s
    if not rhs and "->" not in eq:  # implicit output: letters that appear once, sorted
        counts = {c: lhs.count(c) for c in sizes}
        rhs = "".join(sorted(c for c, n in counts.items() if n == 1))
    summed = [c for c in sizes if c not in rhs]
    if len(ops) == 1:
        return {"other_flops": ops[0].numel}
    return {"macs": call.out.numel * math.prod(sizes[c] for c in summed)}


def _sdpa_function(call: OpCall):
    q, k, v = call.arg(0, "query"), call.arg(1, "key"), call.arg(2, "value")
    if not all(isinstance(t, TensorArg) for t in (q, k, v)):
        return None
    batch = math.prod(call.out.shape[:-2]) if call.out is not None else math.prod(q.shape[:-2])
    L, E = q.shape[-2], q.shape[-1]
    S, Ev = k.shape[-2], v.shape[-1]
    return {"macs": batch * L * S * (E + Ev), "other_flops": 3 * batch * L * S}


def _attention_macs(n: int, lq: int, lk: int, e: int, kdim: int, vdim: int) -> int:
    """MACs of multi-head attention with projections: n sequences, lq queries, lk keys, embedding e
    (the heads split e, so QKᵀ and AV cost n·lq·lk·e each whatever the number of heads)."""
    projections = n * lq * e * e + n * lk * kdim * e + n * lk * vdim * e + n * lq * e * e
    return projections + 2 * n * lq * lk * e


def _mha_module(m: nn.MultiheadAttention, ins, out):
    if not ins:
        return None
    q = ins[0]
    k = ins[1] if len(ins) > 1 else q
    if len(q) == 2:  # unbatched (L, E)
        n, lq, lk = 1, q[0], k[0]
    elif m.batch_first:
        n, lq, lk = q[0], q[1], k[1]
    else:
        n, lq, lk = q[1], q[0], k[0]
    macs = _attention_macs(n, lq, lk, m.embed_dim, m.kdim, m.vdim)
    other = 3 * n * m.num_heads * lq * lk
    if m.in_proj_bias is not None:
        other += n * (lq + 2 * lk) * m.embed_dim
    if m.out_proj.bias is not None:
        other += n * lq * m.embed_dim
    return {"macs": macs, "other_flops": other}


def _tokens(shape: tuple, batch_first: bool) -> tuple[int, int]:
    """(batch, length) of an (L, N, E) / (N, L, E) / (L, E) sequence."""
    if len(shape) == 2:
        return 1, shape[0]
    return (shape[0], shape[1]) if batch_first else (shape[1], shape[0])


def _encoder_layer_cost(m: nn.TransformerEncoderLayer, shape: tuple) -> tuple[int, int]:
    n, l = _tokens(shape, m.self_attn.batch_first)
    sa = _mha_module(m.self_attn, [shape, shape, shape], shape)
    ff_dim = m.linear1.out_features
    e = m.linear1.in_features
    macs = sa["macs"] + 2 * n * l * e * ff_dim
    # biases of the two linears, the activation, two LayerNorms, two residual adds
    other = sa["other_flops"] + n * l * (ff_dim + e) + n * l * ff_dim + 2 * (5 * n * l * e) + 2 * n * l * e
    return macs, other


def _decoder_layer_cost(m: nn.TransformerDecoderLayer, tgt: tuple, memory: tuple) -> tuple[int, int]:
    n, lt = _tokens(tgt, m.self_attn.batch_first)
    _, lm = _tokens(memory, m.self_attn.batch_first)
    sa = _mha_module(m.self_attn, [tgt, tgt, tgt], tgt)
    ca = _mha_module(m.multihead_attn, [tgt, memory, memory], tgt)
    ff_dim, e = m.linear1.out_features, m.linear1.in_features
    macs = sa["macs"] + ca["macs"] + 2 * n * lt * e * ff_dim
    other = sa["other_flops"] + ca["other_flops"] + n * lt * (2 * ff_dim + e) + 3 * (5 * n * lt * e) + 3 * n * lt * e
    return macs, other


def _encoder_layer_module(m, ins, out):
    macs, other = _encoder_layer_cost(m, ins[0])
    return {"macs": macs, "other_flops": other}


def _encoder_module(m: nn.TransformerEncoder, ins, out):
    macs = other = 0
    for layer in m.layers:
        a, b = _encoder_layer_cost(layer, ins[0])
        macs, other = macs + a, other + b
    if m.norm is not None:
        other += 5 * math.prod(ins[0])
    return {"macs": macs, "other_flops": other}


def _decoder_layer_module(m, ins, out):
    macs, other = _decoder_layer_cost(m, ins[0], ins[1] if len(ins) > 1 else ins[0])
    return {"macs": macs, "other_flops": other}


def _decoder_module(m: nn.TransformerDecoder, ins, out):
    macs = other = 0
    for layer in m.layers:
        a, b = _decoder_layer_cost(layer, ins[0], ins[1] if len(ins) > 1 else ins[0])
        macs, other = macs + a, other + b
    if m.norm is not None:
        other += 5 * math.prod(ins[0])
    return {"macs": macs, "other_flops": other}


def _transformer_module(m: nn.Transformer, ins, out):
    src, tgt = ins[0], ins[1] if len(ins) > 1 else ins[0]
    enc = _encoder_module(m.encoder, [src], src)
    dec = _decoder_module(m.decoder, [tgt, src], tgt)
    return {"macs": enc["macs"] + dec["macs"], "other_flops": enc["other_flops"] + dec["other_flops"]}


# -- element-wise, norms, pooling ------------------------------------------------------------------

def _per_output_element(factor: int):
    """``factor`` other FLOPs per output element; usable as a module rule (module, input_shapes,
    output_shape) and as a function rule (call)."""
    def rule(*a):
        out = a[2] if len(a) == 3 else (a[0].out.shape if a[0].out is not None else None)
        return {"other_flops": factor * math.prod(out)} if out is not None else {}
    return rule


def _per_input_element(factor: int = 1):
    def module_rule(m, ins, out):
        return {"other_flops": factor * math.prod(ins[0])} if ins else {}

    def function_rule(call: OpCall):
        ts = call.tensors()
        return {"other_flops": factor * ts[0].numel} if ts else {}
    return module_rule, function_rule


def _free(*a):
    return {}


def _pool_module(m, ins, out):
    nd = _spatial_dims(m)
    k = _ntuple(m.kernel_size, nd)
    return {"other_flops": math.prod(out) * math.prod(k)}


def _pool_function(call: OpCall):
    if call.out is None:
        return None
    name = getattr(call.node.target, "__name__", "")
    nd = 3 if "3d" in name else 1 if "1d" in name else 2
    k = _ntuple(call.arg(1, "kernel_size", 1), nd)
    return {"other_flops": call.out.numel * math.prod(k)}


def _lrn_module(m, ins, out):
    return {"other_flops": (m.size + 3) * math.prod(out)}


def _interp_cost(out_numel: int, mode: str, nd: int) -> int:
    return out_numel * (2 ** nd if mode in ("linear", "bilinear", "trilinear", "bicubic") else 1)


def _upsample_module(m, ins, out):
    return {"other_flops": _interp_cost(math.prod(out), m.mode, len(out) - 2)}


def _interpolate_function(call: OpCall):
    if call.out is None:
        return None
    return {"other_flops": _interp_cost(call.out.numel, call.arg(4, "mode", "nearest") or "nearest",
                                        len(call.out.shape) - 2)}


def _swin_window_attention(call: OpCall):
    """torchvision's ``shifted_window_attention`` (kept opaque by ``torch.fx.wrap``)."""
    x, qkv_w, proj_w = call.arg(0, "input"), call.arg(1, "qkv_weight"), call.arg(2, "proj_weight")
    ws = call.arg(4, "window_size")
    heads = call.arg(5, "num_heads")
    if not (isinstance(x, TensorArg) and isinstance(qkv_w, TensorArg) and isinstance(ws, (list, tuple))
            and isinstance(heads, int)):
        return None
    b, h, w, c = x.shape
    ph = -(-h // ws[0]) * ws[0]
    pw = -(-w // ws[1]) * ws[1]
    tokens, n = b * ph * pw, ws[0] * ws[1]
    macs = tokens * c * qkv_w.shape[0] + 2 * tokens * n * c + tokens * c * proj_w.shape[0]
    other = 3 * tokens * heads * n + tokens * heads * n  # softmax + bias add
    return {"macs": macs, "other_flops": other}


def _swin_attention_module(m, ins, out):
    """torchvision's ``ShiftedWindowAttention[V2]`` kept as a leaf: the same cost as the function,
    plus V2's continuous position-bias MLP over the (2·w₀−1)(2·w₁−1) relative-coordinate table."""
    b, h, w, c = ins[0]
    ws = m.window_size
    ph, pw = -(-h // ws[0]) * ws[0], -(-w // ws[1]) * ws[1]
    tokens, n = b * ph * pw, ws[0] * ws[1]
    macs = tokens * c * m.qkv.out_features + 2 * tokens * n * c + tokens * c * m.proj.out_features
    mlp = getattr(m, "cpb_mlp", None)
    if mlp is not None:
        table = (2 * ws[0] - 1) * (2 * ws[1] - 1)
        macs += sum(table * layer.in_features * layer.out_features for layer in mlp if isinstance(layer, nn.Linear))
    return {"macs": macs, "other_flops": 4 * tokens * m.num_heads * n}


def _relative_mha_module(m, ins, out):
    """torchvision MaxViT's ``RelativePositionalMultiHeadAttention`` on [B, G, P, D]."""
    b, g, p, d = ins[0]
    inner = m.n_heads * m.head_dim
    macs = b * g * p * (d * 3 * inner + inner * d) + 2 * b * g * m.n_heads * p * p * m.head_dim
    return {"macs": macs, "other_flops": 4 * b * g * m.n_heads * p * p}


# -- registration tables -----------------------------------------------------------------------------

_ACTIVATION_NAMES = [
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "selu_", "celu", "celu_", "gelu",
    "silu", "mish", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid",
    "softplus", "softsign", "logsigmoid", "tanhshrink", "threshold", "threshold_", "glu", "prelu", "rrelu",
]
_ELEMENTWISE_NAMES = [
    "add", "add_", "iadd", "sub", "sub_", "isub", "rsub", "mul", "mul_", "imul", "div", "div_", "truediv", "itruediv",
    "floordiv", "floor_divide", "neg", "pow", "pow_", "sqrt", "rsqrt", "exp", "exp_", "log", "log_", "abs", "clamp",
    "clamp_", "clip", "clamp_min", "clamp_max", "where", "masked_fill", "masked_fill_", "maximum", "minimum", "sign",
    "erf", "sin", "cos", "reciprocal", "square", "lerp", "addcmul", "addcdiv", "fmod", "remainder", "mod",
    "stochastic_depth", "drop_block2d", "drop_block3d", "eq", "ne", "lt", "le", "gt", "ge", "logical_not",
    "logical_and", "logical_or", "bitwise_and", "bitwise_or", "invert", "not_", "and_", "or_", "xor",
]
_REDUCE_NAMES = ["mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod", "norm", "logsumexp", "argmax",
                 "argmin", "cumsum", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                 "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "topk", "sort"]
_VIEW_NAMES = [
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand",
    "expand_as", "narrow", "chunk", "split", "unbind", "getitem", "size", "dim", "detach", "view_as", "reshape_as",
    "movedim", "swapaxes", "swapdims", "as_strided", "select", "unfold", "dropout", "dropout1d", "dropout2d",
    "dropout3d", "alpha_dropout", "feature_alpha_dropout", "getattr", "numel", "type", "tensor_split", "_assert",
    "split_with_sizes", "identity", "real", "imag", "conj",
]
_MEMORY_NAMES = [
    "cat", "concat", "concatenate", "stack", "hstack", "vstack", "pad", "roll", "clone", "repeat", "tile",
    "repeat_interleave", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zeros", "ones", "empty",
    "full", "zeros_like", "ones_like", "empty_like", "full_like", "rand", "randn", "rand_like", "randn_like",
    "arange", "linspace", "gather", "index_select", "take_along_dim", "flip", "to", "float", "half", "double",
    "bfloat16", "int", "long", "bool", "type_as", "channel_shuffle", "pixel_shuffle", "pixel_unshuffle", "embedding",
    "one_hot", "tril", "triu", "meshgrid", "scatter", "index_put", "masked_select", "nonzero", "bernoulli",
    "bernoulli_", "zero_", "fill_", "copy_", "contiguous", "_get_relative_position_bias", "_patch_merging_pad", "tensor",
    "as_tensor", "broadcast_to", "diag", "outer",
]
_NORM_FUNCTIONS = {"batch_norm": 2, "layer_norm": 5, "group_norm": 5, "instance_norm": 5, "rms_norm": 4,
                   "normalize": 3, "local_response_norm": 5}

# function namespaces searched for the names above (call_function targets are these objects)
_NAMESPACES = (torch, F, operator, torch.special, torch.linalg)

_INPLACE_NAMES = {n for n in _ACTIVATION_NAMES + _ELEMENTWISE_NAMES + _MEMORY_NAMES
                  if n.endswith("_") and not n.startswith("_")} | {"iadd", "isub", "imul", "itruediv"}


def _register_names(names: Iterable[str], rule: FunctionRule, category: str) -> None:
    for name in names:
        _METHOD_RULES.setdefault(name, (rule, category))
        for ns in _NAMESPACES:
            obj = getattr(ns, name, None)
            if obj is not None and callable(obj) and not isinstance(obj, type):
                try:
                    _FUNCTION_RULES.setdefault(obj, (rule, category))
                except TypeError:
                    pass


def _install_builtin_rules() -> None:
    M = nn.modules
    reg = register_module_cost
    reg(M.conv._ConvNd, _conv_module, category="conv")
    reg(nn.Linear, _linear_module, category="linear")
    reg(nn.Bilinear, _bilinear_module, category="linear")
    reg(nn.MultiheadAttention, _mha_module, category="attention")
    reg(nn.TransformerEncoderLayer, _encoder_layer_module, category="attention")
    reg(nn.TransformerEncoder, _encoder_module, category="attention")
    reg(nn.TransformerDecoderLayer, _decoder_layer_module, category="attention")
    reg(nn.TransformerDecoder, _decoder_module, category="attention")
    reg(nn.Transformer, _transformer_module, category="attention")
    for cls in (M.batchnorm._BatchNorm,):
        reg(cls, _per_output_element(2), category="norm")
    for cls in (M.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm):
        reg(cls, _per_output_element(5), category="norm")
    if hasattr(nn, "RMSNorm"):
        reg(nn.RMSNorm, _per_output_element(4), category="norm")
    reg(nn.LocalResponseNorm, _lrn_module, category="norm")
    reg(nn.CrossMapLRN2d, _lrn_module, category="norm")
    for cls in (M.pooling._MaxPoolNd, M.pooling._AvgPoolNd, M.pooling._LPPoolNd):
        reg(cls, _pool_module, category="pool")
    adaptive, _ = _per_input_element(1)
    for cls in (M.pooling._AdaptiveAvgPoolNd, M.pooling._AdaptiveMaxPoolNd):
        reg(cls, adaptive, category="pool")
    for cls in (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
                nn.Tanhshrink, nn.Threshold, nn.GLU, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink):
        reg(cls, _per_output_element(1), category="activation")
    for cls in (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d):
        reg(cls, _per_output_element(3), category="activation")
    for cls in (M.dropout._DropoutNd, nn.Identity, nn.Flatten, nn.Unflatten):
        reg(cls, _free, category="view")
    for cls in (M.padding._ConstantPadNd, M.padding._ReflectionPadNd, M.padding._ReplicationPadNd,
                nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Embedding):
        reg(cls, _free, category="memory")
    if hasattr(M.padding, "_CircularPadNd"):
        reg(M.padding._CircularPadNd, _free, category="memory")
    reg(nn.Upsample, _upsample_module, category="pool")

    _register_names(_ACTIVATION_NAMES, _per_output_element(1), "activation")
    _register_names(["softmax", "log_softmax", "softmin"], _per_output_element(3), "activation")
    _register_names(_ELEMENTWISE_NAMES, _per_output_element(1), "elementwise")
    _, reduce_fn = _per_input_element(1)
    _register_names(_REDUCE_NAMES, reduce_fn, "reduce")
    _register_names(_VIEW_NAMES, _free, "view")
    _register_names(_MEMORY_NAMES, _free, "memory")
    for name, factor in _NORM_FUNCTIONS.items():
        _register_names([name], _per_output_element(factor), "norm")
    _register_names(["conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"],
                    _conv_function, "conv")
    _register_names(["linear"], _linear_function, "linear")
    _register_names(["matmul", "mm", "bmm", "imatmul"], _matmul_function, "matmul")
    _register_names(["addmm", "baddbmm"], _addmm_function, "matmul")
    _register_names(["einsum"], _einsum_function, "matmul")
    _register_names(["scaled_dot_product_attention"], _sdpa_function, "attention")
    _register_names(["max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                     "lp_pool1d", "lp_pool2d"], _pool_function, "pool")
    _register_names(["interpolate", "upsample", "upsample_bilinear", "upsample_nearest"], _interpolate_function,
                    "pool")
    _QUALNAME_RULES["torchvision.models.swin_transformer.shifted_window_attention"] = (_swin_window_attention,
                                                                                       "attention")
    for cls in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2"):
        _QUALNAME_MODULE_RULES[f"torchvision.models.swin_transformer.{cls}"] = (_swin_attention_module, "attention")
    _QUALNAME_MODULE_RULES["torchvision.models.maxvit.RelativePositionalMultiHeadAttention"] = (
        _relative_mha_module, "attention")
    _QUALNAME_RULES["torchvision.ops.stochastic_depth.stochastic_depth"] = (_per_output_element(1), "elementwise")
    _QUALNAME_RULES["torchvision.models.swin_transformer._get_relative_position_bias"] = (_free, "memory")
    _QUALNAME_RULES["torchvision.models.swin_transformer._patch_merging_pad"] = (_free, "memory")


_install_builtin_rules()

_ALIAS_CATEGORIES = {"view"}


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


def _is_inplace(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name in _INPLACE_NAMES:
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
        found = _module_rule(m)
        if found is None:
            problem = UnknownCost(node.name, f"{type(m).__module__}.{type(m).__qualname__}",
                                  f"leaf module '{node.target}' ({type(m).__qualname__}) has no cost rule; "
                                  f"register one with graphsel.analysis.cost.register_module_cost")
        else:
            rule, category = found
            call = OpCall(node, _substitute(node.args, outs_of), _substitute(node.kwargs, outs_of), outs)
            in_shapes = [t.shape for t in call.tensors()]
            # a module without a tensor output has nothing to cost (registered rules still run)
            result = rule(m, in_shapes, out_shape) if out_shape is not None or category == "module" else {}
    else:
        row.kind = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
        found = _function_rule(node)
        if not outs and (found is None or found[1] != "module"):
            category = "scalar"  # shape arithmetic, asserts: no tensor, no cost
        elif found is None:
            problem = UnknownCost(node.name, row.target, f"{node.op} '{row.target}' has no cost rule; register "
                                                         f"one with graphsel.analysis.cost.register_function_cost")
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
    if cat in _ALIAS_CATEGORIES or cat == "scalar":
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
    """
    if isinstance(n_units, bool) or not isinstance(n_units, int) or n_units < 1:
        raise ValueError(f"distributed_cost: n_units must be a positive int, got {n_units!r}")
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
                raise ValueError(f"distributed_cost: predecessor {p!r} of {v!r} is not a node of the DAG")
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
            raise ValueError(f"distributed_cost: the graph has a cycle through {remaining[:3]!r}")
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
    from graphsel.ir.shapes import propagate_shapes
    from graphsel.ir.tracing import _as_tuple, trace

    if not isinstance(model_or_gm, nn.Module):
        raise TypeError(f"graphsel.cost expects a torch.nn.Module or a GraphModule, got {type(model_or_gm).__name__}")
    if isinstance(model_or_gm, fx.GraphModule):
        if example_inputs is not None:
            propagate_shapes(model_or_gm, _as_tuple(example_inputs))
        return graph_cost(model_or_gm)
    model = model_or_gm
    arity = len(_as_tuple(example_inputs) or (None,))
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
