"""Physical slicing of modules and tensors along channel positions (used by Materialize and by
the mask oracle, which runs channel-reducing ops on the kept channels only).

Every function takes ``keep``: a 1-D LongTensor (or sequence) of positions to keep, in order,
and returns a NEW module; the input module is never modified. Sliced tensors are fresh memory
(``index_select`` copies); a tensor that is not sliced is cloned, so nothing is shared.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .copying import shallow_copy_module


def as_index(keep: Sequence[int] | torch.Tensor, device=None) -> torch.Tensor:
    t = keep if isinstance(keep, torch.Tensor) else torch.as_tensor(list(keep), dtype=torch.long)
    return t.to(dtype=torch.long, device=device)


def slice_tensor(t: torch.Tensor, dim: int, keep) -> torch.Tensor:
    """``t.index_select(dim, keep)`` keeping Parameter-ness and requires_grad."""
    idx = as_index(keep, t.device)
    out = t.detach().index_select(dim, idx)            # a copy already
    if isinstance(t, nn.Parameter):
        return nn.Parameter(out, requires_grad=t.requires_grad)
    return out


def _replace_param(m: nn.Module, name: str, dim: int, keep) -> None:
    t = getattr(m, name, None)
    if t is None:
        return
    new = slice_tensor(t, dim, keep)
    if isinstance(t, nn.Parameter):
        setattr(m, name, new)
    else:
        m._buffers[name] = new


def _clone(m: nn.Module) -> nn.Module:
    return shallow_copy_module(m)


def slice_conv(m: nn.Conv1d | nn.Conv2d | nn.Conv3d, keep_out=None, keep_in=None) -> nn.Module:
    """A conv with output channels ``keep_out`` and input channels ``keep_in`` (positions over all
    groups). For grouped convs both must keep the same positions within every group."""
    new = _clone(m)
    g = m.groups
    w = m.weight
    if keep_out is not None:
        keep_out = as_index(keep_out)
        w = w.detach().index_select(0, keep_out)
        if m.bias is not None:
            new.bias = nn.Parameter(m.bias.detach().index_select(0, keep_out), m.bias.requires_grad)
        new.out_channels = len(keep_out)
    if keep_in is not None:
        keep_in = as_index(keep_in)
        per = m.in_channels // g
        if g == 1:
            w = w.index_select(1, keep_in)
        else:
            local = keep_in.reshape(g, -1) - torch.arange(g).unsqueeze(1) * per
            if not bool((local == local[:1]).all()):
                raise ValueError(f"grouped conv input positions differ between groups: {keep_in.tolist()}")
            w = w.index_select(1, local[0])
        new.in_channels = len(keep_in)
    new.weight = nn.Parameter(w.detach() if w is not m.weight else w.detach().clone(), m.weight.requires_grad)
    return new


def slice_depthwise(m: nn.Conv1d | nn.Conv2d | nn.Conv3d, keep) -> nn.Module:
    """A depthwise conv (groups = in = out channels) restricted to channels ``keep``."""
    keep = as_index(keep)
    new = _clone(m)
    new.weight = nn.Parameter(m.weight.detach().index_select(0, keep), m.weight.requires_grad)
    if m.bias is not None:
        new.bias = nn.Parameter(m.bias.detach().index_select(0, keep), m.bias.requires_grad)
    new.in_channels = new.out_channels = new.groups = len(keep)
    return new


def slice_linear(m: nn.Linear, keep_out=None, keep_in=None) -> nn.Linear:
    new = _clone(m)
    w = m.weight.detach()
    if keep_out is not None:
        keep_out = as_index(keep_out)
        w = w.index_select(0, keep_out)
        if m.bias is not None:
            new.bias = nn.Parameter(m.bias.detach().index_select(0, keep_out), m.bias.requires_grad)
        new.out_features = len(keep_out)
    if keep_in is not None:
        keep_in = as_index(keep_in)
        w = w.index_select(1, keep_in)
        new.in_features = len(keep_in)
    new.weight = nn.Parameter(w if (keep_out is not None or keep_in is not None) else w.clone(),
                              m.weight.requires_grad)
    return new


def slice_per_channel(m: nn.Module, keep) -> nn.Module:
    """BatchNorm / InstanceNorm / LayerNorm (1-D) / GroupNorm / PReLU restricted to channels ``keep``."""
    keep = as_index(keep)
    new = _clone(m)
    k = len(keep)
    if isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, nn.modules.instancenorm._InstanceNorm):
        for name in ("weight", "bias", "running_mean", "running_var"):
            _replace_param(new, name, 0, keep)
        new.num_features = k
    elif isinstance(m, nn.LayerNorm):
        for name in ("weight", "bias"):
            _replace_param(new, name, 0, keep)
        new.normalized_shape = (k,)
    elif isinstance(m, nn.GroupNorm):
        per = m.num_channels // m.num_groups
        for name in ("weight", "bias"):
            _replace_param(new, name, 0, keep)
        if m.num_groups == m.num_channels:
            new.num_groups = k
        elif m.num_groups > 1:
            if k % per:
                raise ValueError(f"GroupNorm keeps {k} channels, not whole groups of {per}")
            new.num_groups = k // per
        new.num_channels = k
    elif isinstance(m, nn.PReLU):
        if m.num_parameters > 1:
            _replace_param(new, "weight", 0, keep)
            new.num_parameters = k
    elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return slice_depthwise(m, keep)
    else:
        raise TypeError(f"cannot slice {type(m).__name__} per channel")
    return new
