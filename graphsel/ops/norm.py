"""Normalisation layers. BatchNorm and InstanceNorm act per channel (their parameters and
statistics are a per-channel slot); LayerNorm over the channels, GroupNorm and the like *reduce
over channels*: the mask oracle computes them on the kept channels only (GroupNorm's groups
couple their channels, so pruning removes whole groups)."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from graphsel.ops import channel as ch
from graphsel.ops.channel import ParamVal, Reader, TensorVal, Unknown
from graphsel.ops.costs import lrn_module, per_output_element
from graphsel.ops.slicing import slice_batch_norm, slice_group_norm, slice_layer_norm
from graphsel.ops.table import OpSpec, register_op
from graphsel.ops.targets import functions_named


def group_norm_channels(cx, node, m: nn.GroupNorm, args, kwargs):
    v = ch.carry(cx, node, ch.first_arg(args, kwargs), 1)
    if not (isinstance(v, TensorVal) and v.has_channels):
        return v
    g, c = m.num_groups, m.num_channels
    if g == 1:
        cx.a.readers.append(Reader(node.name, "reduce", v.ids, node.target, keeps_channels=True))
    elif g != c:
        blocks = v.ids.reshape(g, c // g)
        for k in range(1, c // g):
            cx.a.union(blocks[:, 0], blocks[:, k])
        cx.a.readers.append(Reader(node.name, "reduce", v.ids, node.target, keeps_channels=True))
    if m.affine:
        cx.a.add_slot(("module", node.target, "chan"), v.ids, node)
    return v


def layer_norm_channels(cx, node, m: nn.LayerNorm, args, kwargs):
    x = ch.first_arg(args, kwargs)
    if not (isinstance(x, TensorVal) and x.has_channels):
        return ch.carry(cx, node, x)
    nd = len(m.normalized_shape)
    if x.dim < len(x.shape) - nd:
        return ch.carry(cx, node, x)            # normalises over non-channel dims only
    if nd != 1:
        return cx.a.barrier(node, f"LayerNorm '{node.target}' normalises over channels and other dimensions", x)
    cx.a.readers.append(Reader(node.name, "reduce", x.ids, node.target, keeps_channels=True))
    if m.elementwise_affine:
        cx.a.add_slot(("module", node.target, "chan"), x.ids, node)
    return TensorVal(cx.out_shape(node) or x.shape, x.dim, x.ids)


def batch_norm_function_channels(cx, node, fn, args, kwargs):
    """F.batch_norm(x, running_mean, running_var, weight, bias, ...): per channel; the statistics
    and affine parameters read with get_attr become parameter slots."""
    v = ch.carry(cx, node, args[0], 1)
    if isinstance(v, TensorVal) and v.has_channels:
        names = ("running_mean", "running_var", "weight", "bias")
        for p in list(args[1:5]) + [kwargs.get(n) for n in names[len(args) - 1:]]:
            if isinstance(p, ParamVal):
                cx.a.add_slot(("param", p.target, 0), v.ids, node)
            elif isinstance(p, TensorVal):
                return cx.a.barrier(node, "batch_norm with computed statistics", [args, kwargs])
    return v


def layer_norm_function_channels(cx, node, fn, args, kwargs):
    x = args[0]
    shape_arg = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    bias = args[3] if len(args) > 3 else kwargs.get("bias")
    if not (isinstance(x, TensorVal) and x.has_channels):
        return ch.carry(cx, node, x)
    nd = len(shape_arg) if isinstance(shape_arg, (list, tuple)) else 1
    if x.dim < len(x.shape) - nd:
        return ch.carry(cx, node, x)
    if nd != 1 or any(isinstance(p, (TensorVal, Unknown)) for p in (weight, bias)):
        return cx.a.barrier(node, "layer_norm over channels and other dimensions", [args, kwargs])
    cx.a.readers.append(Reader(node.name, "reduce", x.ids, keeps_channels=True))
    for p in (weight, bias):
        if isinstance(p, ParamVal):
            cx.a.add_slot(("param", p.target, 0), x.ids, node)
    return TensorVal(cx.out_shape(node) or x.shape, x.dim, x.ids)


def group_norm_function_channels(cx, node, fn, args, kwargs):
    x = args[0]
    if isinstance(x, TensorVal) and x.has_channels:
        return cx.a.barrier(node, "functional group_norm", [args, kwargs])
    return ch.carry(cx, node, x)


def rewrite_layer_norm(mx, n, x: TensorVal, out) -> None:
    """F.layer_norm over the channels: its normalized_shape from the kept channels."""
    nd = len(n.args[1]) if len(n.args) > 1 else len(n.kwargs["normalized_shape"])
    if x.dim >= len(x.shape) - nd:
        mx.set_arg(n, 1, "normalized_shape", tuple(mx.new_shape(x)[-nd:]))


def layer_norm_on_kept(node, x_kept, rest, kwargs):
    """The oracle's F.layer_norm on the kept channels: normalized_shape follows them."""
    k = x_kept.shape[-1]
    if rest:
        rest = [(k,)] + list(rest[1:])
    if "normalized_shape" in kwargs:
        kwargs = {**kwargs, "normalized_shape": (k,)}
    return rest, kwargs


_NORM5 = dict(cost=per_output_element(5), category="norm")
_bn = dict(channels=ch.per_channel(1), cost=per_output_element(2), category="norm",
           params=("weight", "bias", "running_mean", "running_var"), slice=slice_batch_norm, chain=True)
register_op(nn.modules.batchnorm._BatchNorm, OpSpec("batch_norm", families=("batch_norm",), **_bn))
register_op(nn.BatchNorm2d, OpSpec("batch_norm", families=("batch_norm", "batch_norm_2d"), **_bn))
register_op(nn.modules.instancenorm._InstanceNorm, OpSpec(
    "instance_norm", ch.per_channel(1, slot=lambda m: m.affine or m.track_running_stats),
    params=("weight", "bias", "running_mean", "running_var"), slice=slice_batch_norm, chain=True, **_NORM5))
register_op(nn.GroupNorm, OpSpec("group_norm", group_norm_channels, params=("weight", "bias"),
                                 slice=slice_group_norm, **_NORM5))
register_op(nn.LayerNorm, OpSpec("layer_norm", layer_norm_channels, params=("weight", "bias"),
                                 slice=slice_layer_norm, **_NORM5))
if hasattr(nn, "RMSNorm"):
    register_op(nn.RMSNorm, OpSpec("rms_norm", cost=per_output_element(4), category="norm"))
register_op([nn.LocalResponseNorm, nn.CrossMapLRN2d], OpSpec("local_response_norm", cost=lrn_module, category="norm"))
register_op(F.batch_norm, OpSpec("batch_norm", batch_norm_function_channels, cost=per_output_element(2),
                                 category="norm"))
register_op(F.layer_norm, OpSpec("layer_norm", layer_norm_function_channels, rewrite=rewrite_layer_norm,
                                 oracle=layer_norm_on_kept, **_NORM5))
register_op(F.group_norm, OpSpec("group_norm", group_norm_function_channels, **_NORM5))
# torch.batch_norm & co. (the functions F.* call): costed, not followed
register_op([f for f in functions_named("batch_norm") if f is not F.batch_norm],
            OpSpec("batch_norm", cost=per_output_element(2), category="norm"))
register_op([f for f in functions_named("layer_norm", "group_norm") if f not in (F.layer_norm, F.group_norm)],
            OpSpec("norm", **_NORM5))
register_op(functions_named("instance_norm", "local_response_norm"), OpSpec("norm", **_NORM5))
register_op(functions_named("rms_norm"), OpSpec("rms_norm", cost=per_output_element(4), category="norm"))
register_op(functions_named("normalize"), OpSpec("normalize", cost=per_output_element(3), category="norm"))
