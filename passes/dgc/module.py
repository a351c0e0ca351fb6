"""``DynamicGroupConv2d``, the dynamic group convolution layer (DGC; paper 002, ``methods.md`` §2),
and its saliency generator.

A DGC layer splits a convolution into H heads. Every head owns a *saliency generator* over all
C_in inputs and a convolution producing C_out/H outputs; per input sample each head computes
only the C_in − k input channels its generator ranks highest, scaled by their saliency::

    x̂ = ReLU(BN(x))                      (absorbed from the graph, or added: option, or none)
    g_i = act(fc2_i(ReLU(fc1_i(GAP(x̂)))))  head i, N × C_in  (act = ReLU; identity when signed)
    keep_i = the C_in − k largest |g_i| (head-wise)   or   |g_i| ≥ T (global threshold)
    y_i = conv_i(x̂ ⊙ g_i ⊙ keep_i)         C_out/H outputs;  output channel j·H + i ← y_i[j]

The eval-mode fast path lives in :mod:`.fast`, the ranking of channels (and its form under
``torch.export``) in :mod:`.ranking`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from graphsel.ir.tracing import register_leaf_module

from .fast import _FastPath, _Static
from .ranking import _exporting, _rank

SMALL_INPUT = 80              # the squeeze rate is halved below this many input channels (authors' rule)


def squeeze_width(in_channels: int, squeeze_rate: int = 16) -> int:
    """Hidden width of a saliency generator: C_in // r, with r halved when C_in < 80 (r = 16 → 8),
    at least 1."""
    r = squeeze_rate // 2 if in_channels < SMALL_INPUT else squeeze_rate
    return max(1, in_channels // max(1, r))


SALIENCY_INITS = ("exact", "authors")


class SaliencyGenerator(nn.Module):
    """H independent generators over the pooled input: ``fc1`` (C → d, no bias) → ReLU → ``fc2``
    (d → C, bias). Returns the pre-activation saliencies, N × H × C.

    Parameters are stacked over heads: ``fc1_weight`` H×d×C, ``fc2_weight`` H×C×d, ``fc2_bias``
    H×C. ``fc1`` is Kaiming-normal initialised (as the authors do). ``fc2`` depends on ``init``:

    * ``"exact"`` (default): weight 0, bias 1, so every saliency is exactly 1 and a layer made by
      :meth:`DynamicGroupConv2d.from_conv` computes the conv it replaced (function-preserving);
    * ``"authors"``: the authors' code — weight Kaiming-normal (fan-in d, gain √2), bias 1. The
      saliencies then start as a random function of the input around 1 (ReLU(1 + W₂z), spread of
      order one), so the layer does **not** compute the conv it replaced. W₂z grows with the
      scale of the layer's input, so the output grows with its square: the authors normalise every
      DGC layer's input (their BN → ReLU, ``placement="paper"``). Before training, an eval-mode BN
      with fresh running statistics is the identity, and a deep network whose layers read
      unnormalised inputs can overflow (torchvision's ResNet-18, every conv converted without added
      BN, overflows at its 14th DGC layer).
    """

    def __init__(self, in_channels: int, heads: int, hidden: int, *, init: str = "exact", device=None, dtype=None):
        super().__init__()
        _check_init(init)
        kw = dict(device=device, dtype=dtype)
        self.in_channels, self.heads, self.hidden = in_channels, heads, hidden
        self.fc1_weight = nn.Parameter(torch.empty(heads, hidden, in_channels, **kw))
        self.fc2_weight = nn.Parameter(torch.zeros(heads, in_channels, hidden, **kw))
        self.fc2_bias = nn.Parameter(torch.ones(heads, in_channels, **kw))
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "exact") -> None:
        """(Re-)initialise: fc1 Kaiming-normal per head; fc2 as ``init`` says (see the class docstring)."""
        _check_init(init)
        with torch.no_grad():
            for h in range(self.heads):
                nn.init.kaiming_normal_(self.fc1_weight[h])
                if init == "authors":
                    nn.init.kaiming_normal_(self.fc2_weight[h])
                else:
                    self.fc2_weight[h].zero_()
            self.fc2_bias.fill_(1.0)
        self.init = init

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        n, heads = pooled.shape[0], self.heads
        z = torch.relu(torch.mm(pooled, self.fc1_weight.view(heads * self.hidden, self.in_channels).t()))
        s = torch.baddbmm(self.fc2_bias.unsqueeze(1), z.view(n, heads, self.hidden).transpose(0, 1),
                          self.fc2_weight.transpose(1, 2))                                   # H × N × C
        return s.transpose(0, 1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels} → {self.hidden} → {self.in_channels}, heads={self.heads}, "
                f"init={getattr(self, 'init', 'exact')}")


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


@register_leaf_module
class DynamicGroupConv2d(_FastPath, nn.Module):
    """A dynamic group convolution (see the module docstring for the computation).

    Holds ``norm`` (the absorbed or added BatchNorm2d, or None) and ``pre_relu`` (whether x̂ is
    ReLU(norm(x))), the head-major ``weight`` (C_out × C_in × kh × kw; rows
    ``[i·C_out/H, (i+1)·C_out/H)`` are head i, i.e. rows ``i::H`` of the dense conv's weight),
    ``bias`` (C_out, in output order, or None) and ``saliency`` (:class:`SaliencyGenerator`).

    Buffers (all saved by ``state_dict()``): ``k`` (channels pruned per head and sample in
    head-wise gating), ``ratio`` (target rate ξ), ``scheduled_ratio`` (ξ at the current training
    progress, read by global calibration), ``threshold`` (global threshold T; 0 keeps all),
    ``global_gating`` and ``signed_saliency`` (flags), ``keep_fraction`` (per-head kept fraction
    measured at the last global calibration; read by the cost model).

    ``fast_inference`` (attribute, default True): use the gathered fast path in eval mode.
    After each forward, ``last_saliency`` holds g (N × H × C_in, with its graph in training) and
    ``last_kept`` the kept-channel counts (N × H); neither is exported, copied or saved.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | str | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, bias: bool = False, *, heads: int = 4, ratio: float = 0.5,
                 squeeze_rate: int = 16, norm: nn.BatchNorm2d | None = None, pre_relu: bool = False,
                 init: str = "exact", device=None, dtype=None):
        super().__init__()
        _check_heads(heads)
        _check_ratio(ratio)
        _check_squeeze(squeeze_rate)
        _check_init(init)
        if in_channels % heads or out_channels % heads:
            raise ValueError(f"DynamicGroupConv2d: in_channels={in_channels} and out_channels={out_channels} must "
                             f"both be divisible by heads={heads}")
        if norm is not None and (not isinstance(norm, nn.BatchNorm2d) or norm.num_features != in_channels):
            raise ValueError(f"DynamicGroupConv2d: norm must be a BatchNorm2d over {in_channels} channels, got {norm!r}")
        kw = dict(device=device, dtype=dtype)
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.squeeze_rate = squeeze_rate
        self.norm = norm
        self.pre_relu = bool(pre_relu)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        self.saliency = SaliencyGenerator(in_channels, heads, squeeze_width(in_channels, squeeze_rate), init=init, **kw)
        fkw = dict(device=device, dtype=dtype if dtype is not None and dtype.is_floating_point else None)
        self.register_buffer("k", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("ratio", torch.tensor(float(ratio), **fkw))
        self.register_buffer("scheduled_ratio", torch.tensor(float(ratio), **fkw))
        self.register_buffer("threshold", torch.zeros((), **fkw))
        self.register_buffer("global_gating", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("signed_saliency", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("keep_fraction", torch.ones(heads, **fkw))
        self.fast_inference = True
        self.batch_dispatch = "auto"
        self.last_saliency: torch.Tensor | None = None
        self._kept: Any = None            # last_kept: a tensor, or (n, heads, width, device) made on demand
        self._rows_cache: tuple | None = None
        self._static_cache: _Static | None = None
        self._k_int, self._global, self._signed, self._mirrored = 0, False, False, None
        self.reset_parameters()

    # -- construction ---------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Conv-style initialisation of weight and bias (nn.Conv2d's rule)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, heads: int = 4, ratio: float = 0.5, squeeze_rate: int = 16,
                  norm: nn.BatchNorm2d | None = None, pre_relu: bool = False,
                  init: str = "exact") -> "DynamicGroupConv2d":
        """A DGC layer holding ``conv``'s weight (head i: rows ``i::heads``) after ``norm`` → ReLU.
        With ``init="exact"`` (default) it computes exactly ``conv(ReLU(norm(x)))`` (or ``conv(x)``
        without ``norm``) while k = 0: saliency ≡ 1. ``init="authors"`` starts the saliency
        generators as the authors' code does (:class:`SaliencyGenerator`): not function-preserving."""
        if conv.groups != 1:
            raise ValueError(f"DynamicGroupConv2d.from_conv: groups={conv.groups}; DGC converts groups=1 convs only")
        if conv.padding_mode != "zeros":
            raise ValueError(f"DynamicGroupConv2d.from_conv: padding_mode={conv.padding_mode!r}; only 'zeros' is supported")
        w = conv.weight
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                bias=conv.bias is not None, heads=heads, ratio=ratio, squeeze_rate=squeeze_rate, norm=norm,
                pre_relu=pre_relu, init=init, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.weight.copy_(torch.cat([w[i::heads] for i in range(heads)], 0))
            if conv.bias is not None:
                m.bias.copy_(conv.bias)
        m.train(conv.training)
        return m

    # -- state ----------------------------------------------------------------------------------
    @property
    def kept_channels(self) -> int:
        """C_in − k: channels each head computes per sample in head-wise gating."""
        return self.in_channels - int(self.k)

    def set_k(self, k: int) -> None:
        """Prune ``k`` input channels per head and sample (0 ≤ k < C_in)."""
        k = int(k)
        if not 0 <= k < self.in_channels:
            raise ValueError(f"DynamicGroupConv2d.set_k: k={k} must be in [0, {self.in_channels}) (C_in = "
                             f"{self.in_channels}; at least one channel stays)")
        self.k.fill_(k)
        self._sync_from_buffers()

    def set_threshold(self, threshold: float) -> None:
        """Set the global threshold T (channels with |g| < T are pruned when global gating is on)."""
        if not math.isfinite(float(threshold)) or float(threshold) < 0:
            raise ValueError(f"DynamicGroupConv2d.set_threshold: T must be a finite number ≥ 0, got {threshold!r}")
        self.threshold.fill_(float(threshold))

    def set_gating(self, mode: str, *, signed: bool | None = None) -> None:
        """``"head"``: keep the C_in − k most salient channels per head (``k``). ``"global"``: keep
        |g| ≥ T (``threshold``); ``signed`` (default: True for global, False for head-wise) drops
        the generator's final ReLU, as the paper's supplement does for the global threshold."""
        if mode not in ("head", "global"):
            raise ValueError(f"DynamicGroupConv2d.set_gating: mode must be 'head' or 'global', got {mode!r}")
        self.global_gating.fill_(mode == "global")
        self.signed_saliency.fill_(bool(mode == "global" if signed is None else signed))
        self._sync_from_buffers()

    @property
    def gating(self) -> str:
        return "global" if bool(self.global_gating) else "head"

    def _sync_from_buffers(self) -> None:
        """Mirror the buffers that steer control flow as Python values (read under torch.export,
        where buffer values are not available). Cheap when they have not changed: keyed by the
        buffers' identities and in-place version counters."""
        b = self._buffers
        k, gg, ss = b["k"], b["global_gating"], b["signed_saliency"]
        key = (id(k), k._version, id(gg), gg._version, id(ss), ss._version)
        if key == self._mirrored:
            return
        self._k_int = int(self.k)
        self._global = bool(self.global_gating)
        self._signed = bool(self.signed_saliency)
        self._mirrored = key

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_from_buffers()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["last_saliency"] = state["_kept"] = state["_rows_cache"] = state["_static_cache"] = None
        state["_mirrored"] = None
        return state

    def __setstate__(self, state):
        state.setdefault("_kept", state.pop("last_kept", None))
        state.setdefault("_static_cache", None)
        state.pop("_workspace", None)                   # per-module buffers of earlier versions
        super().__setstate__(state)

    @property
    def last_kept(self) -> torch.Tensor | None:
        """Kept-channel counts of the last forward (N × H), or None before the first."""
        kept = self._kept
        if isinstance(kept, tuple):                     # head-wise gating: every count is C_in − k
            n, heads, width, device = kept
            kept = self._kept = torch.full((n, heads), width, dtype=torch.long, device=device)
        return kept

    @last_kept.setter
    def last_kept(self, value: torch.Tensor | None) -> None:
        self._kept = value

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, heads={self.heads}, ratio={float(self.ratio):g}, k={int(self.k)}, "
             f"gating={self.gating}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        return s + (", pre=BN→ReLU" if self.norm is not None and self.pre_relu else
                    ", pre=BN" if self.norm is not None else ", pre=ReLU" if self.pre_relu else "")

    # -- forward --------------------------------------------------------------------------------
    def preactivation(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ = ReLU(norm(x)) (or what of it this layer holds)."""
        if self.norm is not None:
            x = self.norm(x)
        return torch.relu(x) if self.pre_relu else x

    def _preactivation_nograd(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`preactivation` without autograd: an eval-mode BatchNorm2d runs as one
        ``batch_norm`` call and the ReLU in place on its fresh output."""
        norm = self.norm
        if norm is None:
            return torch.relu(x) if self.pre_relu else x
        if norm.training or norm.running_mean is None or type(norm).forward is not nn.BatchNorm2d.forward:
            x = norm(x)
        else:
            x = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
        return x.relu_() if self.pre_relu else x

    def saliencies(self, xhat: torch.Tensor) -> torch.Tensor:
        """g (N × H × C_in): the generators' output on GAP(x̂), after ReLU unless signed."""
        g = self.saliency(xhat.flatten(2).mean(-1))
        signed = self._signed if _exporting() else bool(self.signed_saliency)
        return g if signed else torch.relu(g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exporting = _exporting()
        if exporting:
            return self._forward(x, True, False)
        self._sync_from_buffers()
        inference = not self.training and self.fast_inference and not torch.is_grad_enabled()
        return self._forward(x, False, inference)

    def _forward(self, x: torch.Tensor, exporting: bool, inference: bool) -> torch.Tensor:
        if inference:                 # eval, fast path, no autograd: fewer dispatches, in-place ReLUs
            xhat = self._preactivation_nograd(x)
            g = self.saliency(xhat.mean((2, 3)))
            if not self._signed:
                g = g.relu_()
        else:
            xhat = self.preactivation(x)
            g = self.saliencies(xhat)
        idx, scale, kept = self._selection(g, exporting)
        if not exporting:
            state = self.__dict__     # plain attributes: skip nn.Module.__setattr__'s checks
            state["last_saliency"] = g
            state["_kept"] = kept if isinstance(kept, tuple) else kept.detach()
        if idx is None or self.training or not self.fast_inference:
            return self._masked_forward(xhat, g, idx, scale)
        return self._gathered_forward(xhat, idx, scale)

    def _selection(self, g: torch.Tensor, exporting: bool):
        """(idx, scale, kept): per sample and head, the kept channels ranked by |g| (N × H × K),
        their gate values (g, or 0 for padding entries under the global threshold) and the kept
        counts (N × H; in eager head-wise gating the tuple (N, H, C_in − k, device) from which
        :attr:`last_kept` makes them on demand). ``idx`` is None when every channel is kept
        (k = 0, or T = 0)."""
        n, heads, c = g.shape
        key = g.detach()
        if self._signed or exporting:
            key = key.abs()           # unsigned saliencies are ReLU outputs: |g| = g, same order
        if self._global:
            keep = key >= self.threshold
            kept = keep.sum(-1)
            if not exporting and bool(keep.all()):
                return None, None, kept
            width = c if exporting else max(1, int(kept.max()))
            idx = _rank(key, width, exporting)
            return idx, torch.gather(g, -1, idx) * torch.gather(keep, -1, idx).to(g.dtype), kept
        width = c - self._k_int
        if exporting:
            kept = torch.full((n, heads), width, dtype=torch.long, device=g.device)
            if width == c:
                return None, None, kept
            idx = _rank(key, width, exporting)
            return idx, torch.gather(g, -1, idx), kept
        kept = (n, heads, width, g.device)
        if width == c:
            return None, None, kept
        ranked = torch.sort(key, dim=-1, descending=True, stable=True)       # = _rank, with the values
        idx = ranked.indices[..., :width]
        # unsigned: the sorted keys are the gates themselves
        return idx, (torch.gather(g, -1, idx) if self._signed or g.requires_grad else ranked.values[..., :width]), kept

    # above this many input pixels the masked path runs one conv per head: CPU grouped convs
    # (and their backward) are slow on large maps with few channels per group
    _SEPARATE_HEADS_PIXELS = 256

    def _masked_forward(self, xhat, g, idx, scale) -> torch.Tensor:
        """The training formulation: x̂ gated per head (H copies) through one grouped conv
        (groups = H; the authors' formulation), or one conv per head on large maps."""
        n, c, h, w = xhat.shape
        gate = g if idx is None else torch.zeros_like(g).scatter(-1, idx, scale)
        gate = gate.unsqueeze(-1).unsqueeze(-1)
        if h * w > self._SEPARATE_HEADS_PIXELS and self.heads > 1 and not _exporting():
            rows = self.out_channels // self.heads
            out = torch.cat([F.conv2d(xhat * gate[:, i], self.weight[i * rows:(i + 1) * rows], None, self.stride,
                                      self.padding, self.dilation) for i in range(self.heads)], 1)
            return self._interleave(out)
        stacked = (xhat.unsqueeze(1) * gate).reshape(n, self.heads * c, h, w)
        out = F.conv2d(stacked, self.weight, None, self.stride, self.padding, self.dilation, self.heads)
        return self._interleave(out)

    def _interleave(self, out: torch.Tensor, dest: torch.Tensor | None = None) -> torch.Tensor:
        """Head-major conv output → output channel j·H + i from head i; then the bias. Without
        autograd both happen in one pass over the output (one ``add`` or copy into a fresh tensor,
        or into ``dest``)."""
        n, co, ho, wo = out.shape
        heads, bias = self.heads, self.bias
        src = out.view(n, heads, co // heads, ho, wo).transpose(1, 2)
        if dest is None:
            if bias is None:
                return src.reshape(n, co, ho, wo)
            if _exporting() or (torch.is_grad_enabled() and (out.requires_grad or bias.requires_grad)):
                return src.reshape(n, co, ho, wo) + bias.view(1, -1, 1, 1)
            dest = torch.empty((n, co, ho, wo), dtype=out.dtype, device=out.device)
        res = dest.view(n, co // heads, heads, ho, wo)
        if bias is None:
            res.copy_(src)
        else:
            torch.add(src, bias.view(1, co // heads, heads, 1, 1), out=res)
        return dest


def _check_heads(heads: Any) -> None:
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive integer, got {heads!r}")


def _check_ratio(ratio: Any) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"ratio ξ (the fraction of input channels each head prunes) must be a number in [0, 1), "
                         f"got {ratio!r}; e.g. 0.55 for ResNet-18, 0.75 for DenseNet")


def _check_init(init: Any) -> None:
    if init not in SALIENCY_INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, SALIENCY_INITS))} (\"exact\": fc2 weight 0, bias 1, "
                         f"function-preserving; \"authors\": fc2 Kaiming-normal, bias 1), got {init!r}")


def _check_squeeze(r: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"squeeze_rate must be a positive integer (16 in the paper), got {r!r}")


def dgc_modules(model: nn.Module) -> list[tuple[str, DynamicGroupConv2d]]:
    """(path, module) of every DGC layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicGroupConv2d)]


def _require_dgc(model: nn.Module, what: str) -> list[tuple[str, DynamicGroupConv2d]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} expects an nn.Module, got {type(model).__name__}")
    mods = dgc_modules(model)
    if not mods:
        raise ValueError(f"{what}: the model has no DynamicGroupConv2d layer; apply the 'dynamic_group_conv' pass "
                         f"first (graphsel.transform(model, ['dynamic_group_conv']))")
    return mods
