"""``SelectiveConv2d``: a convolution that chooses its input channels (methods.md §1).

The module holds the original ``BatchNorm2d``, an optional dropout and the original ``Conv2d``
(groups = 1) of a ``BN → ReLU → [Dropout] → Conv`` chain, plus one *slot* per input channel:

=================  ===========  =======  ==================================================
state              shape        init     meaning
=================  ===========  =======  ==================================================
``is_open``        C_in buffer  ones     gate per slot (1 open, 0 closed)
``source``         C_in buffer  −1       −1: the slot reads its own channel; s ≥ 0: it reads
                   (long)                channel s of the input, shifted (a re-allocated copy)
``shift``          C_in × 2     zeros    spatial shift ``(b_x, b_y)`` of a copy, in pixels
                   parameter
=================  ===========  =======  ==================================================

Forward: ``x'[:, i] = shift(x[:, source[i]], shift[i])`` for slots with a source (bilinear,
replicate borders, :mod:`.shift`), ``x'[:, i] = x[:, i]`` otherwise; ``h = ReLU(BN(x'))``;
``h = dropout(h)``; ``h *= is_open``; ``y = conv(h)`` (computed as a conv with the closed slots'
weight columns masked: the same, and cheaper than masking the activation). With the initial state
it computes exactly the chain it replaced.

The forward keeps the open/copy slot indices in Python-side caches, refreshed by dealloc/realloc,
by ``load_state_dict`` and, in eager mode, whenever ``source`` / ``is_open`` were edited in place.
Under ``torch.compile`` Dynamo guards on those caches, so a state change (once per epoch in the
first half of training) recompiles the frame instead of running a stale graph (checked with the
eager, aot_eager and inductor backends).

Under torch.distributed the training forward also reads ``shift`` when no slot is a copy
(the conv weight is multiplied by ``1 + 0·Σ shift``: the same values, a zero gradient), so that
DistributedDataParallel's default ``find_unused_parameters=False`` finds a gradient for every
parameter at every step. Single-process and eval forwards are unchanged: there ``shift.grad``
stays None while nothing reads the shifts.

Options kept on the module: ``K`` (re-allocation fan-in: 3 for 1×1 convs, 0 otherwise by
default; 0 means prune only), ``gamma`` (dealloc threshold, > 0) and ``n_max`` (cap on the copies
of one channel, None for no cap). ``origin`` remembers the module paths the chain had in the
traced graph, so that the static lowering can put the BN and the conv back where they were.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphsel import distributed as gd
from graphsel.ir.tracing import register_leaf_module
from graphsel.ops import OpSpec, register_op

from .shift import bilinear_shift

DEFAULT_GAMMA = 1e-3


def default_K(conv: nn.Conv2d) -> int:
    """The paper's re-allocation fan-in: 3 for 1×1 convolutions, 0 (prune only) otherwise."""
    return 3 if tuple(conv.kernel_size) == (1, 1) else 0


def check_options(K: Any = None, gamma: Any = DEFAULT_GAMMA, n_max: Any = None) -> None:
    """Validate the selective-convolution options; raises ``ValueError``/``TypeError`` saying how to fix them."""
    if K is not None:
        if isinstance(K, bool) or not isinstance(K, int):
            raise TypeError(f"K (re-allocation fan-in) must be an int ≥ 0 or None for the default "
                            f"(3 for 1×1 convs, 0 otherwise), got {K!r}")
        if K < 0:
            raise ValueError(f"K (re-allocation fan-in) must be ≥ 0, got {K}: use K=0 to only prune, "
                             f"K>0 to re-allocate closed slots to copies of the K most important channels")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma (dealloc threshold) must be a number in (0, 1), got {gamma!r}")
    if not 0 < gamma < 1:
        raise ValueError(f"gamma (dealloc threshold) must be in (0, 1), got {gamma}: it bounds the normalised "
                         f"damage of each output channel (the paper uses 1e-3); gamma ≤ 0 closes nothing and "
                         f"gamma ≥ 1 may close every slot")
    if n_max is not None:
        if isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 1:
            raise ValueError(f"n_max (copies allowed per channel) must be an int ≥ 1 or None, got {n_max!r}")


@register_leaf_module
class SelectiveConv2d(nn.Module):
    """BN → ReLU → [Dropout] → Conv2d with selectable, re-allocatable input slots (see module docstring)."""

    def __init__(self, bn: nn.BatchNorm2d, conv: nn.Conv2d, dropout: nn.Module | None = None, *,
                 K: int | None = None, gamma: float = DEFAULT_GAMMA, n_max: int | None = None,
                 origin: dict[str, str] | None = None):
        super().__init__()
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"SelectiveConv2d needs an nn.BatchNorm2d, got {type(bn).__name__}")
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"SelectiveConv2d needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"SelectiveConv2d needs a conv with groups=1, got groups={conv.groups}")
        if bn.num_features != conv.in_channels:
            raise ValueError(f"the BatchNorm has {bn.num_features} channels but the conv reads {conv.in_channels}")
        check_options(K, gamma, n_max)
        self.bn = bn
        self.conv = conv
        self.dropout = dropout
        c = conv.in_channels
        w = conv.weight
        self.register_buffer("is_open", torch.ones(c, dtype=w.dtype, device=w.device))
        self.register_buffer("source", torch.full((c,), -1, dtype=torch.long, device=w.device))
        self.shift = nn.Parameter(torch.zeros(c, 2, dtype=w.dtype, device=w.device))
        self.K = default_K(conv) if K is None else int(K)
        self.gamma = float(gamma)
        self.n_max = n_max
        self.origin = dict(origin or {})
        self._replica_slots: torch.Tensor | None = None
        self._replica_sources: torch.Tensor | None = None
        self._any_closed = False
        self._synced_with: tuple | None = None
        self._plain_conv = type(conv).forward is nn.Conv2d.forward
        self.register_load_state_dict_post_hook(_resync_after_load)
        self.sync()

    # -- state ------------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def open_slots(self) -> list[int]:
        return torch.nonzero(self.is_open > 0).flatten().tolist()

    def closed_slots(self) -> list[int]:
        return torch.nonzero(self.is_open <= 0).flatten().tolist()

    def replica_slots(self) -> list[int]:
        """Open slots that read a (shifted) copy of another channel."""
        return torch.nonzero((self.source >= 0) & (self.is_open > 0)).flatten().tolist()

    def _state_key(self) -> tuple:
        return (id(self.source), self.source._version, id(self.is_open), self.is_open._version,
                self.source.device)

    def sync(self) -> None:
        """Recompute the index caches the forward uses from ``source`` and ``is_open``.
        Called by dealloc/realloc and after loading a state dict; eager forwards also notice
        in-place edits of the buffers and resync by themselves."""
        if self.source.is_meta:  # shapes only (costing a model on the meta device): no copies, all open
            self._replica_slots = self._replica_sources = None
            self._any_closed = False
            self._synced_with = self._state_key()
            return
        with torch.no_grad():
            slots = torch.nonzero(self.source >= 0).flatten()
            if slots.numel():
                self._replica_slots = slots
                self._replica_sources = self.source.index_select(0, slots)
            else:
                self._replica_slots = self._replica_sources = None
            self._any_closed = bool((self.is_open <= 0).any())
        self._synced_with = self._state_key()

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and self._synced_with != self._state_key():
            self.sync()
        if self._replica_slots is not None:
            copies = bilinear_shift(x.index_select(1, self._replica_sources),
                                    self.shift.index_select(0, self._replica_slots))
            x = x.index_copy(1, self._replica_slots, copies)
        h = F.relu(self.bn(x), inplace=True)  # the BN output is a fresh tensor read only here
        if self.dropout is not None:
            h = self.dropout(h)
        anchor = self._replica_slots is None and self.training and self.shift.requires_grad and \
            torch.is_grad_enabled() and gd.initialized()
        if not self._any_closed and not anchor:
            return self.conv(h)
        if self._plain_conv:  # conv(h ⊙ gate) = conv(h; W ⊙ gate): mask the (small) weight, not h
            weight = self.conv.weight
            if self._any_closed:
                weight = weight * self.is_open.to(h.dtype).view(1, -1, 1, 1)
            if anchor:
                weight = weight * (1 + 0 * self.shift.sum())
            return self.conv._conv_forward(h, weight, self.conv.bias)
        if self._any_closed:
            h = h * self.is_open.to(h.dtype).view(1, -1, 1, 1)
        y = self.conv(h)
        return y * (1 + 0 * self.shift.sum()) if anchor else y

    # -- state dict -----------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Mean compensation may have given the conv a bias after this module was built.
        bias_key = prefix + "conv.bias"
        if bias_key in state_dict and self.conv.bias is None:
            w = self.conv.weight
            self.conv.bias = nn.Parameter(torch.zeros(self.conv.out_channels, dtype=w.dtype, device=w.device))
        key = prefix + "is_open"
        if key in state_dict and state_dict[key].dtype != self.is_open.dtype:
            state_dict[key] = state_dict[key].to(self.is_open.dtype)
        for name in ("is_open", "source", "shift"):
            k = prefix + name
            if k in state_dict and tuple(state_dict[k].shape[:1]) != (self.in_channels,):
                error_msgs.append(f"{k}: the checkpoint has {state_dict[k].shape[0]} slots but this "
                                  f"SelectiveConv2d reads {self.in_channels} channels; rebuild the model with the "
                                  f"architecture the checkpoint was saved from")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        c = self.in_channels
        if self.source.is_meta:
            return f"K={self.K}, gamma={self.gamma:g}, n_max={self.n_max}, slots={c} (meta)"
        n_open = int((self.is_open > 0).sum())
        n_rep = len(self.replica_slots())
        return (f"K={self.K}, gamma={self.gamma:g}, n_max={self.n_max}, open={n_open}/{c}, "
                f"replicas={n_rep}")


def _resync_after_load(module: SelectiveConv2d, incompatible_keys) -> None:
    module.sync()


def selective_modules(model: nn.Module) -> list[tuple[str, SelectiveConv2d]]:
    """``(path, module)`` for every :class:`SelectiveConv2d` in ``model`` (itself included)."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, SelectiveConv2d)]


def _cost(m: SelectiveConv2d, input_shapes: list, output_shape: tuple) -> dict:
    """Cost of the training-time module: the conv over every slot (closed slots are computed and
    multiplied by zero), BN + ReLU + gate per input element, 4 taps per copied pixel; ``open_macs``
    is what an export keeps."""
    out = math.prod(output_shape)
    per_slot = out * math.prod(m.conv.kernel_size)
    c = m.in_channels
    n_in = math.prod(input_shapes[0]) if input_shapes else 0
    meta = m.source.is_meta
    copies = 0 if meta else len(m.replica_slots())
    n_open = c if meta else int((m.is_open > 0).sum())
    other = 4 * n_in + (8 * n_in * copies // c if c else 0) + (out if m.conv.bias is not None else 0)
    return {"macs": per_slot * c, "other_flops": other, "open_macs": per_slot * n_open}


# a barrier for the channel analysis (its slots are rewired during training); costed as a conv
register_op(SelectiveConv2d, OpSpec("selective_conv", cost=_cost, category="conv"))
