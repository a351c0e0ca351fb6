"""Channel rules: the abstract values the channel analysis computes with, and the building blocks
of every operator's ``OpSpec.channels`` rule.

Every channel produced by a *source* (a convolution or linear output) gets an integer **id**; a
tensor value is abstracted as :class:`TensorVal` (its shape, the dimension carrying channel ids
and the id at each position along it; ``-1``: a position of no channel, never removed). A rule
``rule(cx, node, target, args, kwargs)`` receives the abstract values of the node's arguments and
returns the node's abstract value, using the analysis ``cx`` (``graphsel.analysis.channels``) to
create ids (``cx.a.new_ids``), couple them (``cx.a.union``), record readers and per-channel slots
(``cx.a.readers``, ``cx.a.add_slot``) and freeze what it cannot follow (``cx.a.barrier``,
``cx.a.freeze``). The building blocks here cover the common behaviours:

* :func:`carry` / :func:`per_channel`: per-channel ops keep the ids (and record per-channel
  parameters as a slot, so they are sliced consistently);
* :func:`elementwise`: ops that combine operands position by position **union** the ids they
  align, with broadcasting (an operand of size 1 along the channels is *read*, not coupled);
* :func:`shape_op`: shape ops run on a tensor of ids and read back where the ids land (this derives
  channel shuffles, flatten→Linear feature blocks and NHWC permutes without special cases);
* :func:`reduce`, :func:`softmax`: reductions; over the channels they *reduce over channels*
  (the oracle computes them on the kept channels only).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx


# ------------------------------------------------------------------------------------------
# abstract values


@dataclass
class TensorVal:
    """A tensor: ``ids[i]`` is the channel id at position i of dimension ``dim`` (None: no channels)."""
    shape: tuple[int, ...]
    dim: int | None = None
    ids: np.ndarray | None = None

    @property
    def has_channels(self) -> bool:
        return self.dim is not None

    def full(self) -> torch.Tensor:
        """A tensor of this shape holding the id of every element (-1 where none)."""
        if self.dim is None:
            return torch.full(self.shape, -1, dtype=torch.int64)
        view = [1] * len(self.shape)
        view[self.dim] = len(self.ids)
        return torch.from_numpy(self.ids).view(view).expand(self.shape).contiguous()


@dataclass
class ParamVal:
    """A parameter or buffer read with get_attr (sliceable by target)."""
    target: str
    shape: tuple[int, ...]


@dataclass
class Unknown:
    """A value graphsel does not understand (barrier output)."""
    reason: str


class SizeInt(int):
    """An int read from a channel dimension's size (or computed from one): ``ids`` are the channel
    ids whose count it reflects. Using it to shape a tensor that does not hold those channels, or
    anywhere graphsel cannot follow, freezes them (the size would change under pruning)."""
    ids: np.ndarray

    created = 0     # instances made so far (process-wide): no new ones, no channel counts to follow

    def __new__(cls, value: int, ids: np.ndarray):
        obj = super().__new__(cls, value)
        obj.ids = ids
        SizeInt.created += 1
        return obj


@dataclass
class Reader:
    """A node that reads channel ids: a conv/linear input, a channel reduction, a broadcast operand."""
    node: str
    kind: str                # "conv_in", "linear_in", "reduce", "broadcast", "select"
    ids: np.ndarray          # id at each input position along the read dimension
    module: str | None = None
    keeps_channels: bool = False   # a "reduce" reader whose output keeps the channel dim (norms, softmax)


class PythonOp(Exception):
    """Raised when an 'element-wise' op turns out to be plain Python arithmetic (sizes)."""


def plain(shape) -> TensorVal:
    """A tensor value without channels."""
    return TensorVal(tuple(shape), None, None)


def size_ids(v: Any) -> list[np.ndarray]:
    """The ids of every :class:`SizeInt` in a nested value."""
    if isinstance(v, SizeInt):
        return [v.ids]
    if isinstance(v, (list, tuple)):
        return [i for x in v for i in size_ids(x)]
    if isinstance(v, dict):
        return [i for x in v.values() for i in size_ids(x)]
    if isinstance(v, slice):
        return size_ids([v.start, v.stop, v.step])
    return []


def shape_of(t: TensorVal) -> tuple:
    """``t.shape`` with the channel dimension's size as a :class:`SizeInt`."""
    return tuple(SizeInt(s, t.ids) if t.has_channels and d == t.dim else s for d, s in enumerate(t.shape))


def tensor_vals(v: Any) -> list[TensorVal]:
    if isinstance(v, TensorVal):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in tensor_vals(x)]
    if isinstance(v, dict):
        return [t for x in v.values() for t in tensor_vals(x)]
    return []


def first_unknown(v: Any) -> str:
    """The reason of the first Unknown in a nested value (what made it unknown)."""
    if isinstance(v, Unknown):
        return v.reason
    if isinstance(v, (list, tuple)):
        for x in v:
            r = first_unknown(x)
            if r:
                return r
    if isinstance(v, dict):
        return first_unknown(list(v.values()))
    return ""


def has(v: Any, cls) -> bool:
    if isinstance(v, cls):
        return True
    if isinstance(v, (list, tuple)):
        return any(has(x, cls) for x in v)
    if isinstance(v, dict):
        return any(has(x, cls) for x in v.values())
    return False


def indexed_dims(items: tuple | list, rank: int):
    """For a basic index tuple (ints, slices, None, Ellipsis): ``(position in the tuple, input
    dimension, item)`` for every item that addresses an input dimension."""
    dim = 0
    n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
    for k, it in enumerate(items):
        if it is Ellipsis:
            dim += rank - n_real
            continue
        if it is None:
            continue
        yield k, dim, it
        dim += 1


def fn_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def map_values(v: Any, fn: Callable) -> Any:
    if isinstance(v, (TensorVal, ParamVal)):
        return fn(v)
    if isinstance(v, list):
        return [map_values(e, fn) for e in v]
    if isinstance(v, tuple) and not isinstance(v, torch.Size):
        return tuple(map_values(e, fn) for e in v)
    if isinstance(v, dict):
        return {k: map_values(e, fn) for k, e in v.items()}
    return v


def map_results(out: Any, fn: Callable) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (list, tuple)):
        return type(out)(map_results(o, fn) for o in out) if not hasattr(out, "_fields") else tuple(map_results(o, fn) for o in out)
    return out


def first_arg(args, kwargs):
    """The data input of a call: the first positional argument, else ``input=``, else the first keyword."""
    if args:
        return args[0]
    return kwargs["input"] if "input" in kwargs else next(iter(kwargs.values()), None)


# ------------------------------------------------------------------------------------------
# building blocks


def carry(cx, node: fx.Node, x: Any, channel_dim: int | None = None) -> Any:
    """Per-channel op: output has the input's ids (shape from tensor_meta)."""
    shape = cx.out_shape(node)
    if isinstance(x, Unknown):
        return x
    if isinstance(x, ParamVal):
        x = plain(x.shape)
    if not isinstance(x, TensorVal):
        return concrete_or_unknown(cx, node)
    if shape is None:
        shape = x.shape
    if x.dim is None:
        return plain(shape)
    if len(shape) != len(x.shape) or shape[x.dim] != x.shape[x.dim]:
        return cx.a.barrier(node, f"{fn_name(node)} changes the channel dimension", x)
    if channel_dim is not None and x.dim != norm_dim(channel_dim, len(x.shape)):
        return cx.a.barrier(node, f"{fn_name(node)} works on dimension {channel_dim} but channels are on {x.dim}", x)
    return TensorVal(shape, x.dim, x.ids)


def concrete_or_unknown(cx, node: fx.Node) -> Any:
    shape = cx.out_shape(node)
    if shape is not None:
        return plain(shape)
    return Unknown(f"value of {fn_name(node)}")


def python_call(node: fx.Node, args, kwargs):
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    raise TypeError("not a python call")


def unknown_op(cx, node: fx.Node, args: Any, kwargs: Any, what: str) -> Any:
    """An op without a channel rule: a barrier for every channel reaching it; a plain value
    (or, for pure Python values, the computed value) otherwise."""
    vals = [args, kwargs]
    if has(vals, Unknown):
        tv = tensor_vals(vals)
        if any(t.has_channels for t in tv):
            cx.a.barrier(node, f"{what} {fn_name(node)} mixes channels with the output of "
                               f"{first_unknown(vals)}", vals)
        return Unknown(first_unknown(vals))          # keep the root cause
    tvals = [t for t in tensor_vals(vals) if t.has_channels]
    if tvals:
        return cx.a.barrier(node, f"{what} {fn_name(node)} is not understood", vals)
    shape = cx.out_shape(node)
    if shape is not None:
        return plain(shape)
    if not has(vals, (TensorVal, ParamVal)):
        try:
            return python_call(node, args, kwargs)
        except Exception:  # noqa: BLE001
            pass
    return Unknown(f"result of {fn_name(node)}")


def elementwise(cx, node: fx.Node, operands: list[Any]) -> Any:
    """Operands combined position by position: ids aligned along the channel dimension are
    unioned; an operand of size 1 there is read (broadcast), not coupled; a per-channel parameter
    operand becomes a slot."""
    shape = cx.out_shape(node)
    if shape is None:
        # scalar arithmetic, e.g. on sizes
        if not any(isinstance(o, (TensorVal, ParamVal, Unknown)) for o in operands):
            raise PythonOp()
        return unknown_op(cx, node, operands, {}, "element-wise op")
    if any(isinstance(o, Unknown) for o in operands):
        cx.a.barrier(node, f"{fn_name(node)} combines channels with the output of "
                           f"{first_unknown(operands)}", operands)
        return Unknown(first_unknown(operands))
    rank = len(shape)
    chans = []
    for o in operands:
        if isinstance(o, TensorVal) and o.has_channels:
            d = o.dim + rank - len(o.shape)
            if o.shape[o.dim] == shape[d] and (shape[d] > 1 or o.shape[o.dim] == 1):
                chans.append((o, d))
    dims = {d for _, d in chans if shape[d] > 1} or {d for _, d in chans}
    if len(dims) > 1:
        return cx.a.barrier(node, f"{fn_name(node)} aligns channels of different dimensions", operands)
    if not dims:
        # nothing carries channels at full size: broadcast reads only
        for o in operands:
            if isinstance(o, TensorVal) and o.has_channels:
                cx.a.readers.append(Reader(node.name, "broadcast", o.ids))
        return plain(shape)
    out_dim = dims.pop()
    full = [(o, d) for o, d in chans if d == out_dim]
    ids = full[0][0].ids
    for o, _ in full[1:]:
        cx.a.union(ids, o.ids)
        # positions without channel in one operand pin the other's ids
        mixed = (ids < 0) != (o.ids < 0)
        if mixed.any():
            cx.a.freeze(np.concatenate([ids[mixed], o.ids[mixed]]), f"{fn_name(node)} adds data graphsel cannot slice")
    for o in operands:
        if isinstance(o, TensorVal):
            if o.has_channels and not any(o is c for c, _ in full):
                cx.a.readers.append(Reader(node.name, "broadcast", o.ids))
            elif not o.has_channels:
                d = out_dim - (rank - len(o.shape))
                if d >= 0 and o.shape[d] == shape[out_dim] and shape[out_dim] > 1:
                    cx.a.freeze(ids, f"{fn_name(node)} combines channels with a tensor graphsel cannot slice (node {node.name})")
        elif isinstance(o, ParamVal):
            d = out_dim - (rank - len(o.shape))
            if d >= 0 and o.shape[d] == shape[out_dim] and shape[out_dim] > 1:
                cx.a.add_slot(("param", o.target, d), ids, node)
    return TensorVal(shape, out_dim, ids)


def dynamic_size_dims(node: fx.Node, args, kwargs) -> set[int] | None:
    """For view/reshape/expand: the output dims whose size is computed (-1, or derived from a
    channel count). When there are any, the channel dimension must be one of them: a literal
    size next to a computed one would disagree after pruning."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name not in ("view", "reshape", "expand", "broadcast_to"):
        return None
    rest = list(args[1:])
    sizes = kwargs.get("size", kwargs.get("shape"))
    if sizes is None:
        sizes = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    dyn = {d for d, v in enumerate(sizes) if isinstance(v, SizeInt) or (isinstance(v, int) and v == -1 and name in ("view", "reshape"))}
    return dyn or None


def shape_op(cx, node: fx.Node, fn: Callable, args: Any, kwargs: Any, layout: bool) -> Any:
    """Run ``fn`` on id tensors and read the result back (:func:`from_full`). ``layout``: the op
    depends on the flat row-major layout (view, reshape, flatten): checked to commute with removal."""
    vals = [args, kwargs]
    if has(vals, Unknown):
        return unknown_op(cx, node, args, kwargs, "shape op")
    tvals = tensor_vals(vals)
    if not any(t.has_channels for t in tvals):
        shape = cx.out_shape(node)
        if shape is not None:
            return plain(shape)
        return Unknown("shape op result")

    def conv(v):
        if isinstance(v, TensorVal):
            return v.full()
        if isinstance(v, ParamVal):
            real = cx.attr(v.target)
            if not real.is_floating_point() and not real.is_complex():
                return real          # an index tensor (e.g. a gather's positions)
            return torch.full(v.shape, -1, dtype=torch.int64)
        return v
    out = fn(*map_values(args, conv), **map_values(kwargs, conv))
    allowed = dynamic_size_dims(node, args, kwargs)
    return map_results(out, lambda t: from_full(cx, node, t, tvals, layout, allowed))


def method_shape_op(layout: bool) -> Callable:
    """The channel rule of a tensor method that only moves elements (view, permute, split, ...)."""
    def rule(cx, node, name, args, kwargs):
        return shape_op(cx, node, lambda t, *a, **k: getattr(t, name)(*a, **k), args, kwargs, layout)
    return rule


def function_shape_op(layout: bool) -> Callable:
    """The channel rule of a function that only moves elements (torch.flatten, torch.cat, ...)."""
    def rule(cx, node, fn, args, kwargs):
        return shape_op(cx, node, fn, args, kwargs, layout)
    return rule


def from_full(cx, node: fx.Node, full: torch.Tensor, inputs: list[TensorVal], layout: bool,
              allowed: set[int] | None = None) -> TensorVal:
    """Read a shape op's id tensor back: choose its channel dimension, union ids within each
    slice along it (so any removal stays rectangular), freeze what cannot be sliced."""
    shape = tuple(full.shape)
    if full.dim() == 0:
        i = int(full.item())
        if i >= 0:
            cx.a.freeze([i], f"{fn_name(node)} selects a single element")
        return plain(shape)
    if (full < 0).all():
        return plain(shape)
    lines_of = [full.movedim(d, 0).reshape(shape[d], -1) for d in range(full.dim())]
    best = None
    for d, lines in enumerate(lines_of):
        if lines.shape[1] == 0 or (allowed is not None and d not in allowed):
            continue
        if bool((lines == lines[:, :1]).all()):
            col = lines[:, 0]
            distinct = len(torch.unique(col[col >= 0]))
            score = (distinct > 1, distinct, shape[d])
            if best is None or score > best[0]:
                best = (score, d)
    if best is not None and (best[0][0] or len(torch.unique(full[full >= 0])) == 1):
        # a clean channel dimension (or a tensor holding one single channel class)
        d = best[1]
        if not best[0][0]:
            same = [t.dim for t in inputs if t.has_channels and len(t.shape) == len(shape)]
            d = same[0] if same and (allowed is None or same[0] in allowed) and bool((lines_of[same[0]] == lines_of[same[0]][:, :1]).all()) else d
        ids = lines_of[d][:, 0].numpy().astype(np.int64, copy=True)
        result = TensorVal(shape, d, ids)
    else:
        # no clean channel dimension: pick the one whose slices merge the fewest ids
        cand = None
        for d, lines in enumerate(lines_of):
            if shape[d] < 2 or (allowed is not None and d not in allowed):
                continue
            merges = sum(len(torch.unique(l[l >= 0])) for l in lines) - shape[d]
            if cand is None or (merges, -shape[d]) < cand[0]:
                cand = ((merges, -shape[d]), d)
        if cand is None:
            d = best[1] if best is not None else (min(allowed) if allowed else 0)
        else:
            d = cand[1]
        lines = lines_of[d]
        ids = np.full(shape[d], -1, dtype=np.int64)
        for i in range(shape[d]):
            u = torch.unique(lines[i])
            pos = u[u >= 0].numpy()
            if len(pos) == 0:
                continue
            ids[i] = pos[0]
            if len(pos) > 1:
                cx.a.union(np.full(len(pos) - 1, pos[0]), pos[1:])
            if (u < 0).any():
                cx.a.freeze(pos, f"{fn_name(node)} mixes channels with data graphsel cannot slice (node {node.name})")
        if len(np.unique(ids[ids >= 0])) <= 1 and shape[d] > 1:
            cx.a.freeze(ids, f"{fn_name(node)} scatters channels across dimensions (node {node.name})")
        result = TensorVal(shape, d, ids)
    if layout:
        src = [t for t in inputs if t.has_channels]
        if len(src) == 1:
            cx.a.check_layout(node, src[0], result)
    return result


def spatial(cx, node: fx.Node, x: Any) -> Any:
    """Pooling / interpolation / spatial padding: channels must be on dimension 1 and are kept."""
    if isinstance(x, TensorVal) and x.has_channels and x.dim != 1:
        return cx.a.barrier(node, f"{fn_name(node)} pools over the channel dimension", x)
    return carry(cx, node, x)


def reduce(cx, node: fx.Node, args, kwargs) -> Any:
    """sum / mean / amax / ... over dims: over the channels, a channel reduction (a reader);
    otherwise the channels are kept (moved when dims before them vanish)."""
    x = first_arg(args, kwargs)
    dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
    shape = cx.out_shape(node)
    if not (isinstance(x, TensorVal) and x.has_channels):
        if isinstance(x, Unknown):
            return x
        return plain(shape) if shape is not None else unknown_op(cx, node, args, kwargs, "reduction")
    rank = len(x.shape)
    if dims is None:
        dims = list(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    dims = {norm_dim(d, rank) for d in dims}
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
    multi = node.target in (torch.max, torch.min) or node.target in ("max", "min")
    if x.dim in dims:
        cx.a.readers.append(Reader(node.name, "reduce", x.ids))
        if shape is None and multi:
            return (Unknown("reduction values"), Unknown("reduction indices"))
        return plain(shape) if shape is not None else Unknown("reduction")
    new_dim = x.dim if keepdim else x.dim - sum(1 for d in dims if d < x.dim)
    if multi:
        vals_shape = tuple(s for i, s in enumerate(x.shape) if i not in dims or keepdim) if not keepdim else \
            tuple(1 if i in dims else s for i, s in enumerate(x.shape))
        v = TensorVal(vals_shape, new_dim, x.ids)
        return (v, plain(vals_shape))
    return TensorVal(shape, new_dim, x.ids)


def softmax(cx, node: fx.Node, x: Any, dim) -> Any:
    """Softmax over the channels reduces over them (computed on the kept channels); otherwise a
    per-channel op."""
    if not (isinstance(x, TensorVal) and x.has_channels) or dim is None:
        return carry(cx, node, x) if dim is not None else cx.a.barrier(node, "softmax without dim", x)
    if norm_dim(dim, len(x.shape)) == x.dim:
        cx.a.readers.append(Reader(node.name, "reduce", x.ids, keeps_channels=True))
    return carry(cx, node, x)


def channel_shuffle(cx, node: fx.Node, x: Any, g: int) -> Any:
    """view(N, g, C/g, ...) → transpose(1, 2) → view(N, C, ...), through the shape-op machinery."""
    if not (isinstance(x, TensorVal) and x.has_channels and x.dim == 1):
        return carry(cx, node, x) if not (isinstance(x, TensorVal) and x.has_channels) else \
            cx.a.barrier(node, "channel shuffle of a non-channel dimension", x)
    n, c = x.shape[:2]
    mid = from_full(cx, node, x.full().reshape(n, g, c // g, *x.shape[2:]), [x], True)
    if mid.dim is None:
        return plain(x.shape)
    mid_t = from_full(cx, node, mid.full().transpose(1, 2), [mid], False)
    return from_full(cx, node, mid_t.full().reshape(x.shape), [mid_t], True)


def per_channel(channel_dim: int | None = 1, slot: bool | Callable[[Any], bool] = True) -> Callable:
    """The channel rule of a per-channel module or function: the output has the input's ids (on
    ``channel_dim``, when given). ``slot`` (a bool, or ``slot(module) -> bool``): the module holds
    one entry per channel (its spec's ``params``), recorded as the slot ``("module", path,
    "chan")`` so that materialize slices it with the channels."""
    def rule(cx, node, target, args, kwargs):
        v = carry(cx, node, first_arg(args, kwargs), channel_dim)
        if node.op == "call_module" and isinstance(v, TensorVal) and v.has_channels and \
                (slot(target) if callable(slot) else slot):
            cx.a.add_slot(("module", node.target, "chan"), v.ids, node)
        return v
    return rule


def carry_rule(cx, node, target, args, kwargs):
    """The channel rule of an op acting on each element (or channel) independently."""
    return carry(cx, node, first_arg(args, kwargs))


def spatial_rule(cx, node, target, args, kwargs):
    return spatial(cx, node, first_arg(args, kwargs))


def softmax_rule(cx, node, target, args, kwargs):
    if node.op == "call_module":
        return softmax(cx, node, first_arg(args, kwargs), target.dim)
    return softmax(cx, node, first_arg(args, kwargs), kwargs.get("dim", args[1] if len(args) > 1 else None))


def elementwise_rule(cx, node, target, args, kwargs):
    """Binary (or n-ary) element-wise ops; plain Python arithmetic on sizes is computed."""
    if node.op == "call_method":
        operands = list(args) + list(kwargs.values())
    else:
        operands = list(args) + [v for k, v in kwargs.items() if k in ("other", "input", "alpha")]
    try:
        return elementwise(cx, node, operands)
    except PythonOp:
        return python_call(node, args, kwargs)


def reduce_rule(cx, node, target, args, kwargs):
    return reduce(cx, node, args, kwargs)


def max_min_rule(cx, node, target, args, kwargs):
    """torch.max / torch.min: a reduction with a dim, an element-wise maximum with a tensor, a
    full reduction otherwise."""
    if node.op == "call_method":
        if len(args) > 1 or "dim" in kwargs:
            return reduce(cx, node, args, kwargs)
        return unknown_op(cx, node, args, kwargs, "method")
    if len(args) >= 2 and isinstance(args[1], int):
        return reduce(cx, node, args, kwargs)
    if len(args) == 2:
        return elementwise(cx, node, list(args))
    return unknown_op(cx, node, args, kwargs, "function")


def python_only(cx, node, target, args, kwargs):
    """Asserts and other calls without a tensor result: nothing to follow."""
    return None


def meta_method(cx, node, name, args, kwargs):
    """size(), dim(), numel() ...: channel counts come back as :class:`SizeInt` (followed)."""
    self_val = args[0] if args else None
    if isinstance(self_val, (TensorVal, ParamVal)):
        shape = self_val.shape
        if name == "size":
            d = args[1] if len(args) > 1 else kwargs.get("dim")
            full = shape_of(self_val) if isinstance(self_val, TensorVal) else tuple(shape)
            return full if d is None else full[d]
        if name in ("dim", "ndimension"):
            return len(shape)
        if name in ("numel", "nelement"):
            return math.prod(shape)
        return Unknown(name)
    return self_val if isinstance(self_val, Unknown) else Unknown(name)


def numel_rule(cx, node, fn, args, kwargs):
    if args and isinstance(args[0], TensorVal):
        return math.prod(args[0].shape) if fn is torch.numel else args[0].shape[0]
    return unknown_op(cx, node, args, kwargs, "function")


def getattr_rule(cx, node, fn, args, kwargs):
    """``getattr(x, name)`` on traced values: shapes (with channel counts), dtypes, ``.T``."""
    if len(args) != 2 or not isinstance(args[1], str):
        return unknown_op(cx, node, args, kwargs, "function")
    x, name = args
    if isinstance(x, TensorVal):
        if name == "shape":
            return shape_of(x)
        if name == "ndim":
            return len(x.shape)
        if name in ("dtype", "device", "is_cuda", "requires_grad"):
            tm = node.args[0].meta.get("tensor_meta")
            return getattr(tm, name, None) if tm is not None and name != "device" else Unknown(name)
        if name in ("T", "mT"):
            return shape_op(cx, node, lambda t: getattr(t, name), [x], {}, False)
    if isinstance(x, ParamVal) and name == "shape":
        return torch.Size(x.shape)
    if isinstance(x, (TensorVal, ParamVal, Unknown)):
        return Unknown(f"attribute {name}")
    try:
        return getattr(x, name)
    except Exception:  # noqa: BLE001
        return Unknown(f"attribute {name}")


def getitem_rule(cx, node, fn, args, kwargs):
    """Indexing: of Python containers (computed), of tensors (basic indexing through the shape-op
    machinery; a single channel or a strided slice of channels freezes them)."""
    x, idx = args[0], args[1]
    if isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
        return x[idx] if isinstance(idx, (int, slice)) else Unknown("getitem")
    if isinstance(x, torch.Size) or isinstance(x, (int, str, dict)):
        try:
            return x[idx]
        except Exception:  # noqa: BLE001
            return Unknown("getitem")
    if isinstance(x, Unknown):
        return x
    if isinstance(x, ParamVal):
        x = plain(x.shape)
    if not isinstance(x, TensorVal):
        return Unknown("getitem")
    if not x.has_channels:
        return plain(cx.out_shape(node) or ())
    items = idx if isinstance(idx, tuple) else (idx,)
    if has(items, (TensorVal, ParamVal, Unknown)):
        return cx.a.barrier(node, "advanced indexing of channels", [x, idx])
    for _, dim, it in indexed_dims(items, len(x.shape)):
        if dim == x.dim and isinstance(it, int):
            cx.a.readers.append(Reader(node.name, "select", x.ids[[it]]))
            cx.a.freeze(x.ids[[it]], f"a single channel is selected by index at node {node.name}")
            return plain(cx.out_shape(node) or ())
        if dim == x.dim and isinstance(it, slice) and it.step not in (None, 1):
            return cx.a.barrier(node, "strided slicing of channels", x)
    return shape_op(cx, node, operator.getitem, [x, idx], {}, False)


def pad_rule(cx, node, fn, args, kwargs):
    """F.pad: spatial padding carries the channels; padding the channel dimension is a barrier."""
    x = args[0]
    pad = args[1] if len(args) > 1 else kwargs.get("pad")
    if isinstance(x, TensorVal) and x.has_channels and isinstance(pad, (list, tuple)):
        padded_dims = {len(x.shape) - 1 - i // 2 for i, p in enumerate(pad) if p}
        if x.dim in padded_dims:
            return cx.a.barrier(node, "padding of the channel dimension", x)
    return carry(cx, node, x)


def cat_rule(cx, node, fn, args, kwargs):
    """Concatenation: the common case (every input carries channels on the concatenated dimension,
    or none: DenseNet, Inception) directly, anything else through the shape-op machinery."""
    fast = _cat_along_channels(cx, node, args, kwargs)
    return fast if fast is not None else shape_op(cx, node, fn, args, kwargs, False)


def _cat_along_channels(cx, node: fx.Node, args, kwargs) -> TensorVal | None:
    tensors = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    shape = cx.out_shape(node)
    if not isinstance(tensors, (list, tuple)) or shape is None or not isinstance(dim, int):
        return None
    dim = norm_dim(dim, len(shape))
    parts = []
    for t in tensors:
        if not isinstance(t, TensorVal) or len(t.shape) != len(shape):
            return None
        if t.has_channels:
            if t.dim != dim:
                return None
            parts.append(t.ids)
        else:
            parts.append(np.full(t.shape[dim], -1, dtype=np.int64))
    if not any(t.has_channels for t in tensors):
        return None
    return TensorVal(shape, dim, np.concatenate(parts))


def channel_shuffle_rule(cx, node, target, args, kwargs):
    if node.op == "call_module":
        return channel_shuffle(cx, node, first_arg(args, kwargs), target.groups)
    return channel_shuffle(cx, node, args[0], args[1])


def barrier_rule(cx, node, target, args, kwargs):
    """An operator registered as a barrier: every channel it touches is frozen."""
    return cx.a.barrier(node, f"{fn_name(node)} is registered as a barrier", [args, kwargs])
