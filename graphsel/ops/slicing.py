"""Physical slicing of modules and tensors along channel positions: the helpers behind the
``OpSpec.slice`` rules (materialize slices with them; the mask oracle runs channel-reducing
modules on the kept channels only).

Every function takes ``keep``: a 1-D LongTensor (or sequence) of positions to keep, in order,
and returns a NEW module; the input module is never modified. Sliced tensors are fresh memory
(``index_select`` copies); a tensor that is not sliced is the input module's (copy-on-write: the
copy's registries are its own, so replacing one of its tensors leaves the input alone).

Materialize slices hundreds of modules per model, so the new module's tensors and sizes are
written straight into its registries and ``__dict__`` (what ``nn.Module.__setattr__`` ends up
doing for a name that already holds a parameter, buffer or plain value), not through
``__setattr__``'s generic checks.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from graphsel.ir.copying import shallow_copy_module


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
    """Slice ``m``'s parameter or buffer ``name`` (when it has one) along ``dim``, in place in
    ``m``'s registry."""
    for registry in (m._parameters, m._buffers):
        t = registry.get(name)
        if t is not None:
            registry[name] = slice_tensor(t, dim, keep)
            return
    t = getattr(m, name, None)                  # not registered (a parametrization's property, say)
    if isinstance(t, torch.Tensor):
        setattr(m, name, slice_tensor(t, dim, keep))


def _set_param(m: nn.Module, name: str, t: torch.Tensor, requires_grad: bool) -> None:
    """``m.<name> = nn.Parameter(t)``; straight into the registry when ``name`` is a registered
    parameter (not, say, a parametrization's property)."""
    p = nn.Parameter(t, requires_grad)
    if name in m._parameters:
        m._parameters[name] = p
    else:
        setattr(m, name, p)


def _set_sizes(m: nn.Module, **sizes: Any) -> None:
    """``m.<name> = value`` for plain attributes (channel counts): straight into ``__dict__`` when
    the attribute lives there, through ``setattr`` otherwise."""
    for name, value in sizes.items():
        if name in m.__dict__:
            m.__dict__[name] = value
        else:
            setattr(m, name, value)


def slice_conv(m: nn.Conv1d | nn.Conv2d | nn.Conv3d, keep_out=None, keep_in=None) -> nn.Module:
    """A conv with output channels ``keep_out`` and input channels ``keep_in`` (positions over all
    groups). For grouped convs both must keep the same positions within every group."""
    new = shallow_copy_module(m)
    g = m.groups
    w = m.weight
    if keep_out is not None:
        keep_out = as_index(keep_out)
        w = w.detach().index_select(0, keep_out)
        if m.bias is not None:
            _set_param(new, "bias", m.bias.detach().index_select(0, keep_out), m.bias.requires_grad)
        _set_sizes(new, out_channels=len(keep_out))
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
        _set_sizes(new, in_channels=len(keep_in))
    _set_param(new, "weight", w.detach() if w is not m.weight else w.detach().clone(), m.weight.requires_grad)
    return new


def slice_depthwise(m: nn.Conv1d | nn.Conv2d | nn.Conv3d, keep) -> nn.Module:
    """A depthwise conv (groups = in = out channels) restricted to channels ``keep``."""
    keep = as_index(keep)
    new = shallow_copy_module(m)
    _set_param(new, "weight", m.weight.detach().index_select(0, keep), m.weight.requires_grad)
    if m.bias is not None:
        _set_param(new, "bias", m.bias.detach().index_select(0, keep), m.bias.requires_grad)
    _set_sizes(new, in_channels=len(keep), out_channels=len(keep), groups=len(keep))
    return new


def slice_linear(m: nn.Linear, keep_out=None, keep_in=None) -> nn.Linear:
    new = shallow_copy_module(m)
    w = m.weight.detach()
    if keep_out is not None:
        keep_out = as_index(keep_out)
        w = w.index_select(0, keep_out)
        if m.bias is not None:
            _set_param(new, "bias", m.bias.detach().index_select(0, keep_out), m.bias.requires_grad)
        _set_sizes(new, out_features=len(keep_out))
    if keep_in is not None:
        keep_in = as_index(keep_in)
        w = w.index_select(1, keep_in)
        _set_sizes(new, in_features=len(keep_in))
    _set_param(new, "weight", w if (keep_out is not None or keep_in is not None) else w.clone(), m.weight.requires_grad)
    return new


def slice_params(*names: str, sizes: Callable[[nn.Module, int], dict] | None = None) -> Callable:
    """The slice rule of a per-channel module: tensors ``names`` (those it has) sliced along
    dimension 0 to the kept channels ``parts["chan"]``; ``sizes(module, k)`` gives the attributes
    that count channels (``{"num_features": k}``)."""
    def rule(m: nn.Module, parts: dict[str, torch.Tensor]) -> nn.Module:
        keep = as_index(parts["chan"])
        new = shallow_copy_module(m)
        for name in names:
            _replace_param(new, name, 0, keep)
        if sizes is not None:
            _set_sizes(new, **sizes(m, len(keep)))
        return new
    return rule


def slice_conv_rule(m: nn.Module, parts: dict[str, torch.Tensor]) -> nn.Module:
    """The slice rule of Conv1d/2d/3d: a depthwise conv per channel, any other by its input and
    output slots."""
    if "chan" in parts:
        return slice_depthwise(m, parts["chan"])
    return slice_conv(m, parts.get("out"), parts.get("in"))


def slice_linear_rule(m: nn.Module, parts: dict[str, torch.Tensor]) -> nn.Module:
    return slice_linear(m, parts.get("out"), parts.get("in"))


def _group_norm_sizes(m: nn.GroupNorm, k: int) -> dict:
    per = m.num_channels // m.num_groups
    if m.num_groups == m.num_channels:
        return {"num_groups": k, "num_channels": k}
    if m.num_groups > 1:
        if k % per:
            raise ValueError(f"GroupNorm keeps {k} channels, not whole groups of {per}")
        return {"num_groups": k // per, "num_channels": k}
    return {"num_channels": k}


slice_batch_norm = slice_params("weight", "bias", "running_mean", "running_var",
                                sizes=lambda m, k: {"num_features": k})
slice_layer_norm = slice_params("weight", "bias", sizes=lambda m, k: {"normalized_shape": (k,)})
slice_group_norm = slice_params("weight", "bias", sizes=_group_norm_sizes)


def slice_prelu(m: nn.PReLU, parts: dict[str, torch.Tensor]) -> nn.Module:
    if m.num_parameters == 1:
        return shallow_copy_module(m)
    return slice_params("weight", sizes=lambda m, k: {"num_parameters": k})(m, parts)
