"""Convolutions, linear layers and matrix products. A conv or linear layer *reads* its input
channels (a consumer) and *creates* ids for its outputs (a source); grouped convolutions couple
the same position of every group; a depthwise convolution is a per-channel op. Functional
convolutions with parameter arguments and matrix products are barriers for channels."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphsel.ops import channel as ch
from graphsel.ops.channel import Reader, TensorVal, Unknown
from graphsel.ops.costs import (addmm_function, bilinear_module, conv_function, conv_module, einsum_function,
                                linear_function, linear_module, matmul_function)
from graphsel.ops.slicing import slice_conv_rule, slice_linear_rule
from graphsel.ops.table import OpSpec, register_op
from graphsel.ops.targets import named


def _group_outputs(cx, m, out):
    g = getattr(m, "groups", 1)
    if g > 1:
        blocks = out.reshape(g, -1)
        for k in range(1, g):
            cx.a.union(blocks[0], blocks[k])


def conv_channels(cx, node, m, args, kwargs):
    x = ch.first_arg(args, kwargs)
    path = node.target
    shape = cx.out_shape(node)
    if isinstance(x, Unknown) or not isinstance(x, TensorVal):
        out = cx.a.new_ids(node, m.out_channels, path)
        _group_outputs(cx, m, out)
        cx.a.add_slot(("module", path, "out"), out, node)
        return TensorVal(shape, 1, out)
    g = m.groups
    if x.has_channels and x.dim != 1:
        cx.a.freeze(x.ids, f"'{path}' reads channels from dimension {x.dim}")
    in_ids = x.ids if x.has_channels and x.dim == 1 else np.full(m.in_channels, -1, dtype=np.int64)
    if g > 1 and g == m.in_channels == m.out_channels:
        # depthwise, multiplier 1: a per-channel op
        cx.a.add_slot(("module", path, "chan"), in_ids, node)
        return TensorVal(shape, 1, in_ids)
    if g > 1:
        blocks = in_ids.reshape(g, m.in_channels // g)
        for k in range(1, g):
            cx.a.union(blocks[0], blocks[k])
            mixed = (blocks[0] < 0) != (blocks[k] < 0)
            if mixed.any():
                cx.a.freeze(np.concatenate([blocks[0][mixed], blocks[k][mixed]]), f"grouped conv '{path}' reads unsliceable data")
    cx.a.readers.append(Reader(node.name, "conv_in", in_ids, path))
    cx.a.add_slot(("module", path, "in"), in_ids, node)
    out = cx.a.new_ids(node, m.out_channels, path)
    _group_outputs(cx, m, out)
    cx.a.add_slot(("module", path, "out"), out, node)
    return TensorVal(shape, 1, out)


def linear_channels(cx, node, m, args, kwargs):
    x = ch.first_arg(args, kwargs)
    path = node.target
    shape = cx.out_shape(node)
    if isinstance(x, TensorVal) and x.has_channels and x.dim != len(x.shape) - 1:
        # channels elsewhere: the linear maps each channel position independently
        if shape is not None and len(shape) == len(x.shape):
            return TensorVal(shape, x.dim, x.ids)
        return cx.a.barrier(node, f"'{path}' changes the channel layout", x)
    in_ids = x.ids if isinstance(x, TensorVal) and x.has_channels else np.full(m.in_features, -1, dtype=np.int64)
    if isinstance(x, TensorVal):
        cx.a.readers.append(Reader(node.name, "linear_in", in_ids, path))
        cx.a.add_slot(("module", path, "in"), in_ids, node)
    out = cx.a.new_ids(node, m.out_features, path)
    cx.a.add_slot(("module", path, "out"), out, node)
    return TensorVal(shape, len(shape) - 1, out)


def functional_layer_channels(cx, node, fn, args, kwargs):
    """F.conv2d(x, weight) / F.linear(x, weight): the weight is data graphsel cannot slice."""
    x = args[0]
    if isinstance(x, TensorVal) and x.has_channels:
        return cx.a.barrier(node, f"functional {fn.__name__} with channel inputs", [args, kwargs])
    shape = cx.out_shape(node)
    return ch.plain(shape) if shape is not None else Unknown(fn.__name__)


_CONV = dict(channels=conv_channels, cost=conv_module, category="conv", slice=slice_conv_rule)
register_op(nn.modules.conv._ConvNd, OpSpec("conv_transpose", cost=conv_module, category="conv"))
register_op([nn.Conv1d, nn.Conv3d], OpSpec("conv", families=("conv",), **_CONV))
register_op(nn.Conv2d, OpSpec("conv", families=("conv", "conv2d"), **_CONV))
register_op(nn.Linear, OpSpec("linear", linear_channels, cost=linear_module, category="linear",
                              slice=slice_linear_rule, families=("linear",)))
register_op(nn.Bilinear, OpSpec("bilinear", cost=bilinear_module, category="linear"))
register_op([F.conv1d, F.conv2d, F.conv3d], OpSpec("conv", functional_layer_channels, cost=conv_function,
                                                   category="conv"))
register_op(named("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
            OpSpec("conv_transpose", cost=conv_function, category="conv"))
register_op(F.linear, OpSpec("linear", functional_layer_channels, cost=linear_function, category="linear"))
register_op(named("matmul", "mm", "bmm", "imatmul"), OpSpec("matmul", cost=matmul_function, category="matmul"))
register_op(named("addmm", "baddbmm"), OpSpec("addmm", cost=addmm_function, category="matmul"))
register_op(named("einsum"), OpSpec("einsum", cost=einsum_function, category="matmul"))


# -- weight-standardised convolutions (timm's StdConv2d / ScaledStdConv2d, BiT, NFNets) ----------------
# Each filter is standardised over its own (C_in/groups × k × k) weights: removing output channels
# leaves the other filters' standardisation as it is (exact), removing input channels would change
# it — so a sliced input side freezes the standardisation at the current weights: the layer
# becomes a plain Conv2d holding its standardised weight (exact w.r.t. the masked model; in
# deployment that weight is a constant anyway, see the ``fold_weight_std`` pass).

def standardized_weight(m: nn.Module) -> torch.Tensor:
    """The weight a weight-standardised conv convolves with (its forward's own formula)."""
    gain = getattr(m, "gain", None)
    scale = (gain * m.scale).view(-1) if gain is not None else None
    with torch.no_grad():
        return F.batch_norm(m.weight.reshape(1, m.out_channels, -1), None, None, weight=scale, training=True,
                            momentum=0.0, eps=m.eps).reshape_as(m.weight)


def as_plain_conv(m: nn.Module) -> nn.Conv2d:
    """A plain Conv2d computing what the weight-standardised ``m`` computes (static padding)."""
    conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                     bias=m.bias is not None, padding_mode=m.padding_mode, device=m.weight.device,
                     dtype=m.weight.dtype)
    conv.weight = nn.Parameter(standardized_weight(m).detach().clone(), requires_grad=m.weight.requires_grad)
    if m.bias is not None:
        conv.bias = m.bias
    conv.train(m.training)
    return conv


def ws_conv_channels(cx, node, m, args, kwargs):
    """A conv whose dynamic SAME padding cannot become a plain conv keeps its input channels."""
    x = ch.first_arg(args, kwargs)
    if getattr(m, "same_pad", False) and isinstance(x, TensorVal) and x.has_channels:
        cx.a.freeze(x.ids, f"weight-standardised conv '{node.target}' with dynamic SAME padding keeps its inputs")
    return conv_channels(cx, node, m, args, kwargs)


def slice_ws_conv(m: nn.Module, parts: dict) -> nn.Module:
    if "in" in parts:                                    # standardisation frozen, then sliced
        return slice_conv_rule(as_plain_conv(m), parts)
    new = slice_conv_rule(m, parts)
    if "out" in parts and getattr(m, "gain", None) is not None:
        new._parameters["gain"] = nn.Parameter(m.gain.detach().index_select(0, parts["out"]),
                                               requires_grad=m.gain.requires_grad)
    return new


def ws_conv_cost(m, ins, out):
    d = conv_module(m, ins, out)
    d["other_flops"] = d.get("other_flops", 0) + 4 * m.weight.numel()     # the standardisation
    return d


register_op([f"timm.layers.std_conv.{c}" for c in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d",
                                                   "ScaledStdConv2dSame")],
            OpSpec("weight_standardized_conv", ws_conv_channels, cost=ws_conv_cost, category="conv",
                   slice=slice_ws_conv))
