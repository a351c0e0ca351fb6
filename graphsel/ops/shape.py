"""Shape, indexing and memory operators: how channel ids move through them, how materialize
rewrites their size arguments after channels are removed, what they cost (nothing but memory)."""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphsel.ops import channel as ch
from graphsel.ops.channel import TensorVal
from graphsel.ops.costs import free
from graphsel.ops.table import OpSpec, register_op
from graphsel.ops.targets import named

# -- rewrite rules (materialize): ``rule(mx, node, x, out)`` once the node's input lost channels


class CannotRewrite(Exception):
    """Materialize cannot express the node for the sliced input (the analysis should have frozen it)."""


def _merge_sizes(old: Any, new_shape: tuple[int, ...]) -> tuple:
    old = list(old)
    if len(old) != len(new_shape):
        raise CannotRewrite(f"size list {old} does not match the output rank {len(new_shape)}")
    # literal sizes change; -1 and sizes computed at run time (checked to follow the channels) stay
    return tuple(s if isinstance(o, int) and o != -1 and o != s else o for o, s in zip(old, new_shape))


def rewrite_sizes(mx, n: fx.Node, x: TensorVal, out: Any) -> None:
    """view / reshape / expand / broadcast_to: literal sizes from the output's new shape."""
    if not isinstance(out, TensorVal):
        return
    new_shape = mx.new_shape(out)
    if n.op == "call_method":
        sizes = n.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)):
            n.args = (n.args[0], _merge_sizes(sizes[0], new_shape))
        elif "size" in n.kwargs or "shape" in n.kwargs:
            key = "size" if "size" in n.kwargs else "shape"
            kw = dict(n.kwargs)
            kw[key] = _merge_sizes(kw[key], new_shape)
            n.kwargs = kw
        else:
            n.args = (n.args[0],) + _merge_sizes(sizes, new_shape)
        mx.count_rewrite()
    else:
        mx.set_arg(n, 1, "size", _merge_sizes(n.args[1], new_shape))


def rewrite_split(mx, n: fx.Node, x: TensorVal, out: Any) -> None:
    """split / chunk along the channels: the kept count of every piece (``chunk`` becomes ``split``)."""
    if not isinstance(out, tuple):
        return
    name = n.target if n.op == "call_method" else n.target.__name__
    args, kwargs = list(n.args), dict(n.kwargs)
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    dim = dim if dim >= 0 else len(x.shape) + dim
    if dim != x.dim:
        return
    c = x.shape[dim]
    keep = mx.keep(x.ids)
    if name == "chunk":
        chunks = kwargs.get("chunks", args[1])
        per = -(-c // chunks)
        sizes = [min(per, c - i * per) for i in range(chunks) if c - i * per > 0]
    elif name == "split":
        spec = kwargs.get("split_size_or_sections", kwargs.get("split_size", args[1]))
        sizes = list(spec) if isinstance(spec, (list, tuple)) else [min(spec, c - i) for i in range(0, c, spec)]
    else:
        raise CannotRewrite("tensor_split along channels")
    starts = np.cumsum([0] + sizes)
    new_sizes = [int(keep[starts[i]:starts[i + 1]].sum()) for i in range(len(sizes))]
    if any(s == 0 for s in new_sizes):
        raise CannotRewrite(f"a split piece loses all its channels ({sizes} -> {new_sizes})")
    n.target = "split" if n.op == "call_method" else torch.split
    n.args = (args[0], new_sizes)
    n.kwargs = {"dim": dim}
    mx.count_rewrite()


def rewrite_getitem(mx, n: fx.Node, x: TensorVal, out: Any) -> None:
    """A slice along the channels: its bounds in kept positions."""
    idx = n.args[1]
    items = list(idx) if isinstance(idx, tuple) else [idx]
    keep = mx.keep(x.ids)
    for k, dim, it in ch.indexed_dims(items, len(x.shape)):
        if dim == x.dim and isinstance(it, slice):
            start, stop, _ = it.indices(x.shape[dim])
            new_start = int(keep[:start].sum())
            new_stop = new_start + int(keep[start:stop].sum())
            items[k] = slice(new_start if it.start is not None else None,
                             new_stop if it.stop is not None else None, None)
            n.args = (n.args[0], tuple(items) if isinstance(idx, tuple) else items[0])
            mx.count_rewrite()
            return


def rewrite_narrow(mx, n: fx.Node, x: TensorVal, out: Any) -> None:
    args = list(n.args)
    off = 1 if n.op == "call_method" or n.target is torch.narrow else 0
    dim, start, length = args[off], args[off + 1], args[off + 2]
    dim = dim if dim >= 0 else len(x.shape) + dim
    if dim != x.dim:
        return
    keep = mx.keep(x.ids)
    args[off + 1] = int(keep[:start].sum())
    args[off + 2] = int(keep[start:start + length].sum())
    n.args = tuple(args)
    mx.count_rewrite()


def rewrite_index_select(mx, n: fx.Node, x: TensorVal, out: Any) -> None:
    """A gather along the channels: its index buffer, in kept positions, for the kept outputs."""
    args = list(n.args)
    dim, idx_node = args[1], args[2]
    dim = dim if dim >= 0 else len(x.shape) + dim
    if dim != x.dim or not (isinstance(idx_node, fx.Node) and idx_node.op == "get_attr"):
        raise CannotRewrite("index_select with a computed index along channels")
    rank = np.cumsum(mx.keep(x.ids)) - 1
    owner_path, _, attr = idx_node.target.rpartition(".")
    owner = mx.gm.get_submodule(owner_path) if owner_path else mx.gm
    old = getattr(owner, attr)
    new = torch.from_numpy(rank[old.cpu().numpy()[mx.keep(out.ids)]]).to(old)
    if attr in owner._buffers:
        owner._buffers[attr] = new
    else:
        setattr(owner, attr, new)
    mx.count_rewrite()


def rewrite_unflatten(mx, n: fx.Node, x: TensorVal, out: Any) -> None:
    if not isinstance(out, TensorVal):
        return
    new_shape = mx.new_shape(out)
    if n.op == "call_module":
        m = mx.gm.get_submodule(n.target)
        start = m.dim if m.dim >= 0 else len(x.shape) + m.dim
        m.unflattened_size = tuple(new_shape[start:][:len(m.unflattened_size)])
        return
    dim = n.args[1] if len(n.args) > 1 else n.kwargs["dim"]
    dim = dim if dim >= 0 else len(x.shape) + dim
    k = len(n.args[2]) if len(n.args) > 2 else len(n.kwargs["sizes"])
    mx.set_arg(n, 2, "sizes", tuple(new_shape[dim:dim + k]))


# -- channel rules of the shape modules


def _flatten_module(cx, node, m: nn.Flatten, args, kwargs):
    return ch.shape_op(cx, node, lambda t: torch.flatten(t, m.start_dim, m.end_dim), [ch.first_arg(args, kwargs)], {}, True)


def _unflatten_module(cx, node, m: nn.Unflatten, args, kwargs):
    return ch.shape_op(cx, node, lambda t: t.unflatten(m.dim, m.unflattened_size), [ch.first_arg(args, kwargs)], {}, True)


# -- the table

_VIEW = dict(cost=free, category="view")
_MEMORY = dict(cost=free, category="memory")

register_op(nn.Flatten, OpSpec("flatten", _flatten_module, **_VIEW))
register_op(nn.Unflatten, OpSpec("unflatten", _unflatten_module, rewrite=rewrite_unflatten, **_VIEW))
register_op(nn.ChannelShuffle, OpSpec("channel_shuffle", ch.channel_shuffle_rule, **_MEMORY))
register_op([nn.PixelShuffle, nn.PixelUnshuffle, nn.Embedding], OpSpec("memory_module", **_MEMORY))

# functions and methods that only move elements; the ones that depend on the row-major layout
# (view, reshape, flatten) are checked to commute with channel removal
_LAYOUT = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}
_SIZES = {"view", "reshape", "expand", "broadcast_to"}
_REWRITES = {**{n: rewrite_sizes for n in _SIZES}, "split": rewrite_split, "chunk": rewrite_split,
             "tensor_split": rewrite_split, "narrow": rewrite_narrow, "index_select": rewrite_index_select,
             "unflatten": rewrite_unflatten}
_SHAPE_FUNCTIONS = (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.split, torch.chunk,
                    torch.squeeze, torch.unsqueeze, torch.narrow, torch.index_select, torch.movedim, torch.swapaxes,
                    torch.swapdims, torch.unflatten, torch.t, torch.tensor_split, torch.unbind, torch.broadcast_to,
                    torch.stack, torch.select, torch.roll, torch.flip)
_SHAPE_METHODS = ("view", "reshape", "flatten", "permute", "transpose", "split", "chunk", "squeeze", "unsqueeze",
                  "narrow", "index_select", "movedim", "swapaxes", "swapdims", "unflatten", "expand", "repeat", "t",
                  "tensor_split", "unbind", "view_as", "reshape_as", "select", "roll", "flip", "broadcast_to", "mT")
_COST_OF = {**{n: _VIEW for n in ("view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "unsqueeze",
                                  "squeeze", "expand", "expand_as", "narrow", "chunk", "split", "unbind", "movedim",
                                  "swapaxes", "swapdims", "select", "tensor_split", "view_as", "reshape_as",
                                  "getitem", "as_strided", "unfold", "split_with_sizes", "real", "imag", "conj")},
            **{n: _MEMORY for n in ("cat", "concat", "concatenate", "stack", "hstack", "vstack", "roll", "repeat",
                                    "tile", "repeat_interleave", "gather", "index_select", "take_along_dim", "flip",
                                    "broadcast_to", "channel_shuffle", "pixel_shuffle", "pixel_unshuffle",
                                    "embedding")}}


def _shape_spec(name: str, layout: bool, method: bool) -> OpSpec:
    rule = ch.method_shape_op(layout) if method else ch.function_shape_op(layout)
    return OpSpec(name, rule, rewrite=_REWRITES.get(name), moves=True, **_COST_OF.get(name, {}))


for _fn in _SHAPE_FUNCTIONS:
    register_op(_fn, _shape_spec(_fn.__name__, _fn.__name__ in _LAYOUT, method=False))
for _name in _SHAPE_METHODS:
    register_op(_name, _shape_spec(_name, _name in _LAYOUT, method=True))
register_op("expand_as", OpSpec("expand_as", lambda cx, node, name, args, kwargs: ch.shape_op(
    cx, node, lambda t, o: t.expand_as(o), args, kwargs, False), **_VIEW))
register_op([torch.cat, torch.concat], OpSpec("cat", ch.cat_rule, families=("cat",), **_MEMORY))
register_op(operator.getitem, OpSpec("getitem", ch.getitem_rule, rewrite=rewrite_getitem, moves=True, **_VIEW))
register_op(getattr, OpSpec("getattr", ch.getattr_rule, **_VIEW))
register_op([F.channel_shuffle] + ([torch.channel_shuffle] if hasattr(torch, "channel_shuffle") else []),
            OpSpec("channel_shuffle", ch.channel_shuffle_rule, **_MEMORY))
register_op(["size", "dim", "numel", "ndimension", "nelement", "is_contiguous", "get_device", "element_size",
             "stride"], OpSpec("tensor_meta", ch.meta_method, **_VIEW))
register_op([torch.numel, len], OpSpec("numel", ch.numel_rule, **_VIEW))
register_op([torch._assert] + [f for f in (getattr(torch, "_assert_async", None),) if f is not None],
            OpSpec("assert", ch.python_only, **_VIEW))

# costed, but not followed by the channel analysis (a barrier where channels reach them)
register_op(named("concatenate", "hstack", "vstack", "tile", "repeat_interleave", "gather", "take_along_dim",
                  "pixel_shuffle", "pixel_unshuffle", "embedding", "new_zeros", "new_ones", "new_empty", "new_full",
                  "new_tensor", "zeros", "ones", "empty", "full", "rand", "randn", "arange", "linspace", "one_hot",
                  "tril", "triu", "meshgrid", "scatter", "index_put", "masked_select", "nonzero", "bernoulli",
                  "bernoulli_", "tensor", "as_tensor", "diag", "outer", "int", "long", "bool"),
            OpSpec("memory", **_MEMORY))
register_op(named("as_strided", "unfold", "split_with_sizes", "real", "imag", "conj", "identity"),
            OpSpec("view", **_VIEW))
