"""Dynamic group convolution (DGC; paper 002, ``methods.md`` §2) as a graphsel pass.

A DGC layer splits a convolution into H heads. Every head owns a *saliency generator* over all
C_in inputs and a convolution producing C_out/H outputs; per input sample each head computes
only the C_in − k input channels its generator ranks highest, scaled by their saliency::

    x̂ = ReLU(BN(x))                      (absorbed from the graph, or added: option, or none)
    g_i = act(fc2_i(ReLU(fc1_i(GAP(x̂)))))  head i, N × C_in  (act = ReLU; identity when signed)
    keep_i = the C_in − k largest |g_i| (head-wise)   or   |g_i| ≥ T (global threshold)
    y_i = conv_i(x̂ ⊙ g_i ⊙ keep_i)         C_out/H outputs;  output channel j·H + i ← y_i[j]

Public API (``graphsel.passes.dynamic_group_conv``):

* :class:`DynamicGroupConv2d` — the module (a registered tracing leaf). ``set_k(k)``,
  ``set_threshold(T)``, ``set_gating("head" | "global", signed=...)``; every piece of state is a
  buffer saved by ``state_dict()``.
* :class:`ApplyDynamicGroupConv` — the pass (registry name ``dynamic_group_conv``).
* Training: :func:`schedule_k`, :func:`schedule_ratio`, :func:`set_progress`,
  :class:`SaliencyLibrary`, :func:`calibrate_global_threshold`, :func:`use_global_threshold`,
  :func:`saliency_lasso`, :func:`angle_enlargement` (and the tensor-level :func:`lasso_of`,
  :func:`angle_of`), :func:`pruning_rates`.
* Cost: :func:`dgc_macs` (registered with ``graphsel.analysis.cost.register_module_cost``),
  :func:`dgc_layer_cost`, :func:`dgc_cost_rows`, :func:`dgc_cost_table`.

Inference. In eval mode the module runs a *fast path*: it gathers the kept input channels of
each head (one ``index_select``) and the matching weight, and runs one convolution with
groups = H and C_in − k inputs per group, whose MACs are the kept fraction of the dense conv's.
Plans by geometry (:meth:`DynamicGroupConv2d._fast_plan`): stride-1 convolutions run as the
equivalent transposed convolution, whose weight is a contiguous row gather from a cached,
C_in-major, flipped copy of the weight; 1×1 convolutions as a batched matmul over rows of a
cached C_in-major copy (strided ones subsample first); other strided convolutions as a grouped
conv whose weight is gathered per head from the head-major weight, in increasing channel order,
straight into the conv's layout. Each gate multiplies whichever operand is smaller (the weight
rows of one sample on large maps, else the gathered inputs). On CPU a head's channel count is
rounded up to a multiple of 16 (extra channels repeated and gated to 0): oneDNN's blocked
kernels are 2–3× slower otherwise. A batch runs either as one conv over the union of its
samples' kept channels, weights shared and each sample's pruned channels gated to 0
(``batch_dispatch="shared"``), or one narrower conv per sample written into its slice of the
result (``"per_sample"``); ``"auto"`` picks the cheaper by a cost model (MACs, weight and input
gathers, calls; 1×1 layers always per sample). Without autograd the gathered operands live in
per-thread buffers shared by all DGC layers (fresh allocations of that size cost CPU time
comparable to what the narrower conv saves; one shared buffer stays in cache from layer to
layer), the pre-activation ReLU runs in place, the head interleave and the bias take one pass,
and the per-call state (``last_saliency``, ``last_kept``) is plain attributes (``last_kept`` made
on demand). Training mode runs the masked formulation (x̂ gated per head; the H gated
copies through one grouped conv as the authors do, or one conv per head on large maps where CPU
grouped convs are slow), which carries gradients to the saliency generators. Fast and masked
paths equal a naive per-sample, per-head loop (tested). Batch-1 CPU latency against the dense
layers: ``benchmarks/dgc_latency.py``.

Tie-breaking. Channels are ranked by |g| with ties broken towards the lower channel index
(stable sort), so exactly C_in − k channels are kept per head and sample (the authors' code
prunes every channel tied with the k-th smallest). Under ``torch.export`` (and so ONNX) the cut
is made explicit with ``topk`` values and a cumulative count of the ties, which selects the same
set.

Global threshold (paper 002 supplement, eq. 1–2). The supplement drops the generator's last
ReLU to keep signed saliencies and prunes ``|g| < T``; :func:`use_global_threshold` does the
same by default (``signed=False`` keeps the ReLU). T is chosen on a window of saliencies (the
"saliency library") so that a fraction ξ of all saliency entries of all layers and heads is
below it, then frozen in a buffer like BatchNorm statistics. Because pruning in one layer
changes the saliencies downstream, :func:`calibrate_global_threshold` re-collects with T in
effect and refines it (``refine`` rounds), so the pruning rate measured on the calibration data
meets ξ. Under ``torch.export`` a global-threshold layer gathers all C_in channels (the kept
count is data dependent) and masks the pruned ones: exact, but without the speed-up.

Cost convention. ``dgc_macs`` (registered with ``graphsel.cost``) counts, per layer, the head
convolutions' multiply-accumulates times the kept fraction plus the saliency generators' fully
connected layers (N·H·2·C_in·C_in/r); BatchNorm, ReLU, GAP and the gating products go to
``other_flops``. On torchvision's ResNet-18 at 224² with ξ = 0.55 and 4 heads (every block conv
converted, the 3-channel stem dense; k = round(ξ·C_in) as the authors' code) this gives
884.5 M MACs against 1814.1 M dense; the paper reports 890 M against 1823 M. The dense figure
is torchvision's published 1.814 GMACs; the paper's 1823 M is that plus the element-wise FLOPs
(BatchNorm, ReLU, pooling, adds: 1814.1 + 9.9 = 1823.9 M). Our DGC count is 0.6 % below the
paper's 890 M (convention: the paper most likely also counts some element-wise work; with the
authors' gating products, H·C_in·H_in·W_in per layer = 8.1 M, reported by
:func:`dgc_layer_cost` as ``gating_macs``, it would be 892.6 M). See the test
``test_paper_resnet18_macs``.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphsel import Contract, Diagnostic, Pass, PassResult, Pattern, register_leaf_module, register_pass
from graphsel.analysis.cost import register_module_cost
from graphsel.errors import PassError
from graphsel.ir.graph import call_count, delete_unused_modules, replace_module
from graphsel.ir.meta import graphsel_meta
from graphsel.analysis.patterns import BATCHNORM2D, CONV2D, RELU

__all__ = [
    "DynamicGroupConv2d", "SaliencyGenerator", "ApplyDynamicGroupConv", "squeeze_width", "schedule_k",
    "schedule_ratio", "set_progress", "dgc_modules", "SaliencyLibrary", "calibrate_global_threshold",
    "use_global_threshold", "saliency_lasso", "angle_enlargement", "lasso_of", "angle_of", "pruning_rates",
    "dgc_macs", "dgc_layer_cost", "dgc_cost_rows", "dgc_cost_table",
]

WARMUP_END = 1.0 / 12.0       # progress ≤ 1/12: no pruning
FINETUNE_START = 3.0 / 4.0    # progress ≥ 3/4: the full rate ξ
SMALL_INPUT = 80              # the squeeze rate is halved below this many input channels (authors' rule)


# ================================================================================================
# The module
# ================================================================================================

def squeeze_width(in_channels: int, squeeze_rate: int = 16) -> int:
    """Hidden width of a saliency generator: C_in // r, with r halved when C_in < 80 (r = 16 → 8),
    at least 1."""
    r = squeeze_rate // 2 if in_channels < SMALL_INPUT else squeeze_rate
    return max(1, in_channels // max(1, r))


class SaliencyGenerator(nn.Module):
    """H independent generators over the pooled input: ``fc1`` (C → d, no bias) → ReLU → ``fc2``
    (d → C, bias). Returns the pre-activation saliencies, N × H × C.

    Parameters are stacked over heads: ``fc1_weight`` H×d×C, ``fc2_weight`` H×C×d, ``fc2_bias``
    H×C. ``fc1`` is Kaiming-normal initialised (as the authors do); ``fc2`` starts at weight 0,
    bias 1, so every saliency is exactly 1 (the function-preserving start).
    """

    def __init__(self, in_channels: int, heads: int, hidden: int, *, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.in_channels, self.heads, self.hidden = in_channels, heads, hidden
        self.fc1_weight = nn.Parameter(torch.empty(heads, hidden, in_channels, **kw))
        self.fc2_weight = nn.Parameter(torch.zeros(heads, in_channels, hidden, **kw))
        self.fc2_bias = nn.Parameter(torch.ones(heads, in_channels, **kw))
        with torch.no_grad():
            for h in range(heads):
                nn.init.kaiming_normal_(self.fc1_weight[h])

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        n, heads = pooled.shape[0], self.heads
        z = torch.relu(torch.mm(pooled, self.fc1_weight.view(heads * self.hidden, self.in_channels).t()))
        s = torch.baddbmm(self.fc2_bias.unsqueeze(1), z.view(n, heads, self.hidden).transpose(0, 1),
                          self.fc2_weight.transpose(1, 2))                                   # H × N × C
        return s.transpose(0, 1)

    def extra_repr(self) -> str:
        return f"{self.in_channels} → {self.hidden} → {self.in_channels}, heads={self.heads}"


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _exporting() -> bool:
    return torch.compiler.is_compiling()


class _Static(NamedTuple):
    """Per-layer constants of the fast path (see :meth:`DynamicGroupConv2d._static`)."""
    key: tuple
    plan: str                                  # "pointwise" | "transpose" | "strided"
    tpad: tuple[int, int] | None               # padding of the equivalent transposed conv
    head_base: torch.Tensor                    # H × 1: i·C_in, row offset of head i in the weight rows


@register_leaf_module
class DynamicGroupConv2d(nn.Module):
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
                 device=None, dtype=None):
        super().__init__()
        _check_heads(heads)
        _check_ratio(ratio)
        _check_squeeze(squeeze_rate)
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
        self.saliency = SaliencyGenerator(in_channels, heads, squeeze_width(in_channels, squeeze_rate), **kw)
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
                  norm: nn.BatchNorm2d | None = None, pre_relu: bool = False) -> "DynamicGroupConv2d":
        """A DGC layer computing exactly ``conv(ReLU(norm(x)))`` (or ``conv(x)`` without ``norm``)
        while k = 0: saliency ≡ 1, head i holds rows ``i::heads`` of ``conv.weight``."""
        if conv.groups != 1:
            raise ValueError(f"DynamicGroupConv2d.from_conv: groups={conv.groups}; DGC converts groups=1 convs only")
        if conv.padding_mode != "zeros":
            raise ValueError(f"DynamicGroupConv2d.from_conv: padding_mode={conv.padding_mode!r}; only 'zeros' is supported")
        w = conv.weight
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                bias=conv.bias is not None, heads=heads, ratio=ratio, squeeze_rate=squeeze_rate, norm=norm,
                pre_relu=pre_relu, device=w.device, dtype=w.dtype)
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

    # -- the fast inference path ----------------------------------------------------------------
    def _numeric_padding(self) -> tuple[int, int]:
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return (0, 0)
            # "same" (stride 1): total padding d·(k−1); PyTorch pads the extra element on the right
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            if any(t % 2 for t in totals):
                return (-1, -1)
            return (totals[0] // 2, totals[1] // 2)
        return self.padding  # type: ignore[return-value]

    def _fast_plan(self) -> str:
        """'pointwise': 1×1 without padding (strided ones subsample first), a batched matmul over
        gathered weight rows; 'transpose': stride 1, the equivalent transposed conv over gathered,
        flipped weight rows; 'strided': the rest, a grouped conv over weights gathered per head."""
        pad = self._numeric_padding()
        if self.kernel_size == (1, 1) and pad == (0, 0):
            return "pointwise"
        if self.stride == (1, 1) and min(pad) >= 0 and all(
                p <= d * (k - 1) for p, d, k in zip(pad, self.dilation, self.kernel_size)):
            return "transpose"
        return "strided"

    def _static(self, device: torch.device) -> "_Static":
        """The geometry-derived constants of the fast path (plan, transposed-conv padding, head
        offsets), computed once and recomputed only when a setting they depend on changes."""
        key = (self.kernel_size, self.stride, self.padding, self.dilation, self.heads, self.in_channels,
               self.out_channels, device)
        st = self._static_cache
        if st is None or st.key != key:
            plan = self._fast_plan()
            tpad = None
            if plan == "transpose":
                tpad = tuple(d * (k - 1) - p for p, d, k in zip(self._numeric_padding(), self.dilation,
                                                                self.kernel_size))
            head_base = (torch.arange(self.heads, device=device) * self.in_channels).view(self.heads, 1)
            st = self._static_cache = _Static(key, plan, tpad, head_base)
        return st

    def _weight_rows(self, flip: bool) -> torch.Tensor:
        """The weight re-laid out C_in-major per head: (H·C_in) × (C_out/H) × kh × kw, spatially
        flipped for the transposed-conv plan (unflipped for the 1×1 plan; the strided plan reads
        the weight itself). Cached while the weight is unchanged (eval, no grad)."""
        w = self.weight
        differentiable = w.requires_grad and torch.is_grad_enabled()
        if _exporting() or differentiable:
            return _rows_of(w, self.heads, flip)
        key = (w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape), flip)
        if self._rows_cache is None or self._rows_cache[0] != key:
            self._rows_cache = (key, _rows_of(w.detach(), self.heads, flip))
        return self._rows_cache[1]

    def _gathered_forward(self, xhat: torch.Tensor, idx: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The fast path. One sample: gather its kept channels and weight rows, one narrower conv.
        A batch: either one conv over the union of the samples' kept channels, with weights
        shared by the batch and each sample's pruned channels gated to 0 (``"shared"``), or one
        narrower conv per sample (``"per_sample"``); ``batch_dispatch="auto"`` picks the cheaper
        by a cost estimate (MACs + weight-gather traffic)."""
        n = xhat.shape[0]
        if n == 1:
            return self._narrow_conv(xhat, idx[0], scale)
        mode = self.batch_dispatch
        if _exporting():
            mode = "per_sample"      # the union's width is data dependent
        union = None
        if mode in ("auto", "shared"):
            union = _union(idx, scale, self.in_channels)
            if mode == "auto":
                mode = self._cheaper(n, self._aligned(idx.shape[-1], xhat), self._aligned(union[0].shape[-1], xhat),
                                     xhat.shape[-2] * xhat.shape[-1])
        if mode == "shared":
            return self._narrow_conv(xhat, *union)
        if mode != "per_sample":
            raise ValueError(f"DynamicGroupConv2d.batch_dispatch must be 'auto', 'shared' or 'per_sample', "
                             f"got {self.batch_dispatch!r}")
        if _exporting() or (torch.is_grad_enabled() and (xhat.requires_grad or self.weight.requires_grad)):
            return torch.cat([self._narrow_conv(xhat[s:s + 1], idx[s], scale[s:s + 1]) for s in range(n)], 0)
        # without autograd every sample's output is written straight into its slice of the result
        out = torch.empty((n, self.out_channels, *self._output_size(*xhat.shape[-2:])), dtype=xhat.dtype,
                          device=xhat.device)
        for s in range(n):
            self._narrow_conv(xhat[s:s + 1], idx[s], scale[s:s + 1], out[s:s + 1])
        return out

    def _output_size(self, h: int, w: int) -> tuple[int, int]:
        if self.padding == "same":
            return h, w
        pad = (0, 0) if self.padding == "valid" else self.padding
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
                     zip((h, w), pad, self.dilation, self.kernel_size, self.stride))  # type: ignore[return-value]

    # Batch dispatch cost model, in MAC equivalents: per gathered weight element (the gather and
    # the convolution's own re-layout of it), per gathered input element (gather and gating) and
    # per extra conv call (gathers, call, interleave). Fitted to the per-layer times of ResNet-18
    # at batch 8 (one thread, AVX-512); on its 16 DGC layers with 3×3 kernels it picks the faster
    # mode. The 1×1 plan (a matmul: cheap calls, tiny MACs) always runs per sample: one shared
    # matmul over the union was 1.1–1.6× slower there.
    _GATHER_COST, _INPUT_COST, _CALL_COST = 50, 8, 5_000_000

    def _cheaper(self, n: int, width: int, union_width: int, pixels: int) -> str:
        if self._static(self.weight.device).plan == "pointwise":
            return "per_sample"
        per_weight = (self.out_channels // self.heads) * self.kernel_size[0] * self.kernel_size[1]
        stride = self.stride[0] * self.stride[1]
        h = self.heads

        def cost(width: int, samples: int) -> float:
            return (h * width * per_weight * (samples * pixels / stride + self._GATHER_COST)
                    + self._INPUT_COST * samples * h * width * pixels)

        shared = cost(union_width, n)
        per_sample = n * (cost(width, 1) + self._CALL_COST)
        return "shared" if shared <= per_sample else "per_sample"

    def _aligned(self, width: int, xhat: torch.Tensor) -> int:
        """The number of input channels per head the narrow conv runs with: ``width`` rounded up to
        a multiple of 16 (of 8 below 8) on CPU. oneDNN's blocked x86 kernels run a grouped or
        transposed conv 2–3× slower when a group's channel count is not such a multiple (ResNet-18
        layer1 shape, batch 1: 29 channels per group 1.6 ms, 32 channels 0.6 ms); the extra
        channels are gated to 0. Not for the 1×1 plan (a matmul) nor under export."""
        if (width <= 4 or width == 8 or width % 16 == 0 or xhat.device.type != "cpu" or _exporting()
                or self._static(xhat.device).plan == "pointwise"):
            return width
        return 8 if width < 8 else -(-width // 16) * 16

    def _narrow_conv(self, xhat: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor,
                     dest: torch.Tensor | None = None) -> torch.Tensor:
        """Convolve the channels ``idx`` (H × U, per head) of every sample, gated by ``gate``
        (N × H × U), with the matching weight rows: one conv with groups = H and U inputs per group.
        Without autograd, the gathered operands live in reused per-thread buffers (fresh
        allocations of this size cost as much as the narrower conv saves on CPU), and the result
        goes into ``dest`` when given."""
        st = self._static(idx.device)
        plan = st.plan
        if plan == "pointwise" and self.stride != (1, 1):
            xhat = xhat[:, :, ::self.stride[0], ::self.stride[1]]
        n, c, h, w = xhat.shape
        heads, width = self.heads, idx.shape[-1]
        co_h = self.out_channels // heads
        kh, kw = self.kernel_size
        reuse = not _exporting() and not (torch.is_grad_enabled() and (xhat.requires_grad or self.weight.requires_grad))
        if gate.dtype != xhat.dtype:
            gate = gate.to(xhat.dtype)
        pad = self._aligned(width, xhat) - width
        if pad:                                           # repeat a kept channel, gated to 0
            idx = torch.cat([idx, idx[:, :1].expand(heads, pad)], 1)
            gate = torch.cat([gate, gate.new_zeros(n, heads, pad)], -1)
            width += pad
        if plan == "strided" and not _exporting():
            # the strided plan gathers short runs from every weight row: in increasing channel
            # order each row is read front to back (≈2× faster from a cold cache than in saliency
            # order); the conv sums in any order
            idx, order = torch.sort(idx, dim=-1)
            gate = torch.gather(gate, -1, order.expand_as(gate))
        xs = self._gather(xhat, 1, idx.reshape(-1), "x", reuse)                        # N × (H·U) × h × w
        # gate whichever operand is smaller: the weight rows (one sample, large maps) or the inputs
        gate_rows = n == 1 and h * w > co_h * kh * kw
        if not gate_rows:
            xs = _scale(xs, gate.reshape(n, heads * width, 1, 1), reuse)
        if plan == "strided":
            # the kept input channels of head i, gathered from its rows of the head-major weight
            # straight into the grouped conv's layout H·(C_out/H) × U × kh × kw (no re-layout copy)
            wh = self.weight.reshape(heads, co_h, self.in_channels, kh * kw)
            if reuse:
                wg = _buffer("w", [heads, co_h, width, kh * kw], wh)
                for i in range(heads):
                    torch.index_select(wh[i], 1, idx[i], out=wg[i])
            else:
                wg = torch.stack([wh[i].index_select(1, idx[i]) for i in range(heads)])
            if gate_rows:
                wg = _scale(wg, gate.reshape(heads, 1, width, 1), reuse)
            out = F.conv2d(xs, wg.view(self.out_channels, width, kh, kw), None, self.stride, self.padding,
                           self.dilation, heads)
            return self._interleave(out, dest)
        rows = self._gather(self._weight_rows(flip=plan == "transpose"), 0, (idx + st.head_base).reshape(-1), "w",
                            reuse)
        if gate_rows:
            rows = _scale(rows, gate.reshape(-1, 1, 1, 1), reuse)
        if plan == "pointwise":                           # N × H × Co/H × (h·w) = rowsᵀ @ xs
            out = torch.matmul(rows.view(heads, width, co_h).transpose(1, 2), xs.view(n, heads, width, h * w))
            return self._interleave(out.view(n, self.out_channels, h, w), dest)
        return self._interleave(F.conv_transpose2d(xs, rows, None, 1, st.tpad, 0, heads, self.dilation), dest)

    def _gather(self, src: torch.Tensor, dim: int, index: torch.Tensor, name: str, reuse: bool) -> torch.Tensor:
        """``src.index_select(dim, index)``, written into a reused buffer when ``reuse``: one per
        thread, shared by all DGC layers (a layer's operands are dead once its conv returned), so
        that in a network the buffer each layer writes is still in cache from the previous one."""
        if not reuse:
            return src.index_select(dim, index)
        shape = list(src.shape)
        shape[dim] = index.numel()
        return torch.index_select(src, dim, index, out=_buffer(name, shape, src))


_WORKSPACE = threading.local()


def _buffer(name: str, shape: list[int], like: torch.Tensor) -> torch.Tensor:
    """A per-thread scratch tensor of ``shape`` (dtype and device of ``like``), grown on demand and
    shared by every DGC layer; its contents are dead after the call that asked for it."""
    store = _WORKSPACE.__dict__
    key = (name, like.dtype, like.device, torch.is_inference_mode_enabled())
    numel = math.prod(shape)
    buf = store.get(key)
    if buf is None or buf.numel() < numel:
        buf = store[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel].view(shape)


def _scale(t: torch.Tensor, factor: torch.Tensor, inplace: bool) -> torch.Tensor:
    return t.mul_(factor) if inplace else t * factor


def _union(idx: torch.Tensor, scale: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the channels some sample keeps with a non-zero gate (H × U, padded with unused
    channels whose gates are 0) and every sample's gates on them (N × H × U)."""
    n, heads, _ = idx.shape
    gates = torch.zeros(n, heads, channels, dtype=scale.dtype, device=scale.device).scatter(-1, idx, scale)
    present = (gates != 0).any(0)
    width = max(1, int(present.sum(-1).max()))
    union = _rank(present.to(torch.uint8), width, False)
    return union, torch.gather(gates, -1, union.unsqueeze(0).expand(n, heads, width))


def _rows_of(w: torch.Tensor, heads: int, flip: bool) -> torch.Tensor:
    co, c, kh, kw = w.shape
    r = w.view(heads, co // heads, c, kh, kw).transpose(1, 2)
    if flip:
        r = r.flip(-2, -1)
    return r.reshape(heads * c, co // heads, kh, kw).contiguous()


def _rank(key: torch.Tensor, width: int, exporting: bool) -> torch.Tensor:
    """Indices of the ``width`` largest entries of ``key`` along the last dim, ties → lower index.

    Eager: a stable sort. Export: ``topk`` breaks ties arbitrarily in PyTorch (ONNX's TopK by
    lower index) and the stable sort has no ONNX translation, so the cut is made explicit: the
    ``width``-th largest value v, everything above v, and the first of the entries equal to v
    (cumulative count) up to ``width``; the kept set is returned in index order."""
    if not exporting:
        return torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :width]
    c = key.shape[-1]
    kth = torch.topk(key, width, dim=-1, largest=True, sorted=True).values[..., -1:]
    above, tied = key > kth, key == kth
    need = width - above.sum(-1, keepdim=True)
    keep = above | (tied & (torch.cumsum(tied.to(torch.int64), -1) <= need))
    score = keep.to(torch.float32) * (c + 1) + torch.arange(c, 0, -1, device=key.device, dtype=torch.float32)
    return torch.topk(score, width, dim=-1, largest=True, sorted=True).indices


def _check_heads(heads: Any) -> None:
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive integer, got {heads!r}")


def _check_ratio(ratio: Any) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"ratio ξ (the fraction of input channels each head prunes) must be a number in [0, 1), "
                         f"got {ratio!r}; e.g. 0.55 for ResNet-18, 0.75 for DenseNet")


def _check_squeeze(r: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"squeeze_rate must be a positive integer (16 in the paper), got {r!r}")


# ================================================================================================
# Training integration: schedule, global threshold, losses
# ================================================================================================

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


def _check_progress(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
        raise ValueError(f"progress must be a number in [0, 1] (fraction of training done), got {p!r}")
    return min(1.0, max(0.0, float(p)))


def schedule_ratio(ratio: float, progress: float) -> float:
    """The pruning rate at training ``progress`` p: 0 for p ≤ 1/12, ξ·1.5·(p − 1/12) in between,
    ξ for p ≥ 3/4 (the authors' schedule, continuous at both ends)."""
    _check_ratio(ratio)
    p = _check_progress(progress)
    if p <= WARMUP_END:
        return 0.0
    if p >= FINETUNE_START:
        return float(ratio)
    return float(ratio) * 1.5 * (p - WARMUP_END)


def schedule_k(in_channels: int, ratio: float, progress: float) -> int:
    """Channels pruned per head at ``progress``: 0 (p ≤ 1/12), round(C_in·ξ·1.5·(p − 1/12))
    (1/12 < p < 3/4), round(C_in·ξ) (p ≥ 3/4); Python's round, as the authors; at most C_in − 1."""
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    _check_ratio(ratio)
    p = _check_progress(progress)
    if p <= WARMUP_END:
        k = 0
    elif p >= FINETUNE_START:
        k = round(in_channels * ratio)
    else:
        k = round(in_channels * ratio * 1.5 * (p - WARMUP_END))
    return min(int(k), in_channels - 1)


def set_progress(model: nn.Module, progress: float) -> dict[str, int]:
    """Apply the pruning schedule at training ``progress`` ∈ [0, 1] to every DGC layer: sets each
    layer's ``k`` (head-wise gating) and ``scheduled_ratio`` (read by global calibration) from its
    own ξ. Returns {path: k}."""
    p = _check_progress(progress)
    out = {}
    for path, m in _require_dgc(model, "set_progress"):
        xi = float(m.ratio)
        m.set_k(schedule_k(m.in_channels, xi, p))
        m.scheduled_ratio.fill_(schedule_ratio(xi, p))
        out[path] = int(m.k)
    return out


def use_global_threshold(model: nn.Module, enabled: bool = True, *, signed: bool = True,
                         threshold: float | None = None) -> None:
    """Switch every DGC layer to global-threshold gating (``signed``: drop the generators' final
    ReLU, the paper's choice) or back to head-wise gating. ``threshold`` sets T as well."""
    for _, m in _require_dgc(model, "use_global_threshold"):
        m.set_gating("global" if enabled else "head", signed=signed if enabled else False)
        if threshold is not None:
            m.set_threshold(threshold)


class SaliencyLibrary:
    """The paper's "saliency library": |g| of every DGC layer and head over the last ``window``
    forward passes (collected by forward hooks while the library is open).

    ``with SaliencyLibrary(model, window=5) as lib: <train or run batches>`` then
    ``lib.threshold(ratio)`` or :func:`calibrate_global_threshold(model, library=lib)`.
    """

    def __init__(self, model: nn.Module, window: int = 5):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"SaliencyLibrary: window must be a positive integer (batches kept), got {window!r}")
        self.modules = _require_dgc(model, "SaliencyLibrary")
        self.window = window
        self.entries: dict[str, deque] = {p: deque(maxlen=window) for p, _ in self.modules}
        self._handles: list = []
        self.open()

    def open(self) -> "SaliencyLibrary":
        if not self._handles:
            for path, m in self.modules:
                self._handles.append(m.register_forward_hook(self._hook(path)))
        return self

    def _hook(self, path: str):
        def hook(module, inputs, output):
            if module.last_saliency is not None:
                self.entries[path].append(module.last_saliency.detach().abs().float().cpu())
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "SaliencyLibrary":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def clear(self) -> None:
        for d in self.entries.values():
            d.clear()

    @property
    def size(self) -> int:
        return sum(t.numel() for d in self.entries.values() for t in d)

    def values(self) -> torch.Tensor:
        """G: every collected |g| of every layer, head and sample, as one flat tensor."""
        parts = [t.reshape(-1) for d in self.entries.values() for t in d]
        if not parts:
            raise ValueError("the saliency library is empty: run forward passes of the model while the library is "
                             "open (with SaliencyLibrary(model) as lib: ...) or give calibrate_global_threshold data")
        return torch.cat(parts)

    def threshold(self, ratio: float) -> float:
        """T such that a fraction ``ratio`` of G lies below it (midway between the neighbours at the
        cut, so the fraction is exact when they differ)."""
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
        v = torch.sort(self.values().double()).values
        m = int(round(float(ratio) * v.numel()))
        if m <= 0:
            return 0.0
        return float((v[m - 1] + v[m]) / 2) if m < v.numel() else float(v[-1]) * (1 + 1e-6) + 1e-12

    def pruning_rates(self, threshold: float) -> dict[str, float]:
        """Per layer: the fraction of collected |g| below ``threshold``."""
        out = {}
        for path, d in self.entries.items():
            if d:
                t = torch.cat([x.reshape(-1) for x in d])
                out[path] = float((t < threshold).double().mean())
        return out


def _batches(data: Any, max_batches: int | None) -> list:
    if data is None:
        return []
    if isinstance(data, torch.Tensor):
        data = [data]
    out = []
    for b in data:
        if max_batches is not None and len(out) >= max_batches:
            break
        out.append(b)
    return out


def _run_batch(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        model(batch[0])  # (inputs, labels) pairs
    elif isinstance(batch, dict):
        model(**batch)
    else:
        raise TypeError(f"calibration batches must be tensors, (inputs, labels) pairs or keyword dicts, "
                        f"got {type(batch).__name__}")


def _default_ratio(mods) -> float:
    """The scheduled ξ of the layers, weighted by their saliency entries (C_in·H)."""
    w = [m.in_channels * m.heads for _, m in mods]
    return sum(float(m.scheduled_ratio) * wi for (_, m), wi in zip(mods, w)) / sum(w)


def calibrate_global_threshold(model: nn.Module, data: Any = None, *, library: SaliencyLibrary | None = None,
                               ratio: float | None = None, max_batches: int | None = None, refine: int = 3,
                               signed: bool = True) -> float:
    """Choose the global threshold T, store it in every DGC layer and switch them to global gating.

    From ``library`` (saliencies collected during training, the paper's way): T is the
    ``ratio``-percentile of the library. From ``data`` (an iterable of input tensors or
    (inputs, labels) batches; ``max_batches`` caps it): the model runs in eval mode without grad
    with global gating on, T is taken from the collected saliencies and refined ``refine`` times
    with T in effect (pruning shifts downstream saliencies), keeping the T whose measured rate
    on the data is closest to ``ratio``. ``ratio`` defaults to the layers' scheduled ξ (see
    :func:`set_progress`). Each layer's ``keep_fraction`` buffer records its measured kept
    fraction per head (for the cost model). Returns T.
    """
    mods = _require_dgc(model, "calibrate_global_threshold")
    if ratio is None:
        ratio = _default_ratio(mods)
    _check_ratio(ratio)
    if library is None and data is None:
        raise ValueError("calibrate_global_threshold needs data: pass data=<iterable of batches> or "
                         "library=<SaliencyLibrary filled during training>")
    if library is not None:
        t = library.threshold(ratio)
        use_global_threshold(model, signed=signed, threshold=t)
        _store_keep_fractions(mods, {p: list(d) for p, d in library.entries.items()}, t)
        return t
    batches = _batches(data, max_batches)
    if not batches:
        raise ValueError("calibrate_global_threshold: the calibration data holds no batch; give at least one")
    from graphsel.pipeline.verify import eval_mode
    use_global_threshold(model, signed=signed, threshold=0.0)
    best: tuple[float, float, dict] | None = None
    with torch.no_grad(), eval_mode(model):
        t = _collect(model, batches).threshold(ratio)          # saliencies with nothing pruned
        for _ in range(max(0, int(refine)) + 1):
            for _, m in mods:
                m.set_threshold(t)
            lib = _collect(model, batches)                     # saliencies with T in effect
            err = abs(float((lib.values() < t).double().mean()) - ratio)
            if best is None or err < best[1]:
                best = (t, err, {p: list(d) for p, d in lib.entries.items()})
            if err < 1e-4:
                break
            t = lib.threshold(ratio)
    for _, m in mods:
        m.set_threshold(best[0])
    _store_keep_fractions(mods, best[2], best[0])
    return best[0]


def _collect(model: nn.Module, batches: list) -> SaliencyLibrary:
    lib = SaliencyLibrary(model, window=len(batches))
    try:
        for b in batches:
            _run_batch(model, b)
    finally:
        lib.close()
    return lib


def _store_keep_fractions(mods, entries: dict[str, list], t: float) -> None:
    for path, m in mods:
        batches = entries.get(path) or []
        if batches:
            g = torch.cat([b.reshape(-1, m.heads, m.in_channels) for b in batches])
            m.keep_fraction.copy_((g >= t).double().mean(dim=(0, 2)).to(m.keep_fraction.dtype))


def lasso_of(saliencies: Sequence[torch.Tensor], weight: float = 1e-5) -> torch.Tensor:
    """λ_s · Σ_layers Σ_heads mean(|g_{l,h}|) over saliency tensors of shape N × H × C."""
    if not saliencies:
        raise ValueError("lasso_of: no saliency tensors")
    total = sum(g.abs().mean(dim=(0, 2)).sum() for g in saliencies)
    return total * weight


def angle_of(saliencies: Sequence[torch.Tensor], weight: float = 1e-4) -> torch.Tensor:
    """Angle-enlargement loss (paper 002 supplement, eq. 3) over saliency tensors N × H × C:
    λ_a · 2/(L·H·(H−1)) · Σ_l Σ_{i<j} |⟨g_i/‖g_i‖, g_j/‖g_j‖⟩|, averaged over the batch.
    Layers with one head contribute nothing (and are not counted in L)."""
    if not saliencies:
        raise ValueError("angle_of: no saliency tensors")
    terms, count = [], 0
    for g in saliencies:
        n, heads, _ = g.shape
        if heads < 2:
            continue
        u = F.normalize(g, dim=-1, eps=1e-12)
        cos = torch.einsum("nic,njc->nij", u, u).abs()
        upper = torch.triu(torch.ones(heads, heads, dtype=torch.bool, device=g.device), diagonal=1)
        terms.append(cos[:, upper].sum(-1).mean() * (2.0 / (heads * (heads - 1))))
        count += 1
    if not terms:
        return saliencies[0].new_zeros(())
    return weight * torch.stack(terms).sum() / count


def _last_saliencies(model: nn.Module, what: str) -> list[torch.Tensor]:
    mods = _require_dgc(model, what)
    missing = [p for p, m in mods if m.last_saliency is None]
    if missing:
        raise RuntimeError(f"{what}: no saliencies recorded for {', '.join(missing[:3])}"
                           f"{' ...' if len(missing) > 3 else ''}; run a forward pass of the model first")
    return [m.last_saliency for _, m in mods]


def saliency_lasso(model: nn.Module, weight: float = 1e-5) -> torch.Tensor:
    """The saliency-lasso loss of the model's last forward: λ_s · Σ_layers Σ_heads mean(|g|)
    (λ_s = 1e-5 in the paper). Differentiable when that forward was."""
    return lasso_of(_last_saliencies(model, "saliency_lasso"), weight)


def angle_enlargement(model: nn.Module, weight: float = 1e-4) -> torch.Tensor:
    """The angle-enlargement loss of the model's last forward (paper 002 supplement eq. 3,
    λ_a = 1e-4, used with the global threshold). See :func:`angle_of`."""
    return angle_of(_last_saliencies(model, "angle_enlargement"), weight)


def pruning_rates(model: nn.Module) -> dict[str, float]:
    """Per DGC layer: the fraction of input channels pruned in the last forward, averaged over
    samples and heads (the paper's Fig. 2)."""
    out = {}
    for path, m in _require_dgc(model, "pruning_rates"):
        if m.last_kept is None:
            raise RuntimeError(f"pruning_rates: layer '{path}' has not run yet; run a forward pass first")
        out[path] = 1.0 - float(m.last_kept.double().mean()) / m.in_channels
    return out


# ================================================================================================
# Cost
# ================================================================================================

def _kept_fractions(m: DynamicGroupConv2d) -> list[float]:
    if bool(m.global_gating):
        if float(m.threshold) <= 0:
            return [1.0] * m.heads
        return [float(f) for f in m.keep_fraction]
    return [(m.in_channels - int(m.k)) / m.in_channels] * m.heads


def dgc_layer_cost(module: DynamicGroupConv2d, input_shapes: list[tuple[int, ...]],
                   output_shape: tuple[int, ...]) -> dict:
    """Cost of a DGC layer, in detail.

    ``macs``: head convolutions × kept fraction (1 − k/C_in per head, or the per-head fractions
    measured at the last global calibration) + the saliency generators (N·H·2·C_in·d).
    ``dense_macs``: the dense convolution it replaced. ``other_flops``: BatchNorm (2 per element),
    ReLU and GAP (1 per input element each) and the gating products of the kept channels
    (N·Σ_heads kept·H_in·W_in). ``kept_fraction``, ``conv_macs``, ``saliency_macs``, and
    ``gating_macs``: the authors' implementation's gating products H·N·C_in·H_in·W_in (H gated
    copies of the input), for comparison with their figures; not part of ``macs``.
    """
    n, c, hi, wi = input_shapes[0]
    ho, wo = output_shape[-2], output_shape[-1]
    kh, kw = module.kernel_size
    per_head = n * (module.out_channels // module.heads) * ho * wo * module.in_channels * kh * kw
    fractions = _kept_fractions(module)
    conv = int(round(sum(per_head * f for f in fractions)))
    sal = n * module.heads * 2 * module.in_channels * module.saliency.hidden
    numel = n * c * hi * wi
    pre = (2 * numel if module.norm is not None else 0) + (numel if module.pre_relu else 0)
    gating = int(round(sum(numel * f for f in fractions)))
    return {"macs": conv + sal, "dense_macs": per_head * module.heads, "other_flops": pre + numel + gating,
            "kept_fraction": sum(fractions) / len(fractions), "conv_macs": conv, "saliency_macs": sal,
            "gating_macs": module.heads * numel}


def dgc_macs(module: DynamicGroupConv2d, input_shapes: list[tuple[int, ...]], output_shape: tuple[int, ...]) -> dict:
    """The rule registered with :func:`graphsel.analysis.cost.register_module_cost`: ``macs``,
    ``dense_macs`` and ``other_flops`` of :func:`dgc_layer_cost` (the additive ones, so that
    ``CostReport.total("dense_macs")`` is the dense model's MACs)."""
    c = dgc_layer_cost(module, input_shapes, output_shape)
    return {"macs": c["macs"], "dense_macs": c["dense_macs"], "other_flops": c["other_flops"]}


def _node_shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def dgc_cost_rows(gm: fx.GraphModule, example_inputs: tuple | None = None) -> list[dict]:
    """One row per conv / linear / DGC node: ``layer``, ``kind``, ``dense_macs``, ``macs`` (and,
    for DGC layers, ``kept_fraction``, ``saliency_macs``, ``gating_macs``). Uses the shapes in
    ``node.meta`` (propagated with ``example_inputs`` when given)."""
    if example_inputs is not None:
        from graphsel.ir.shapes import propagate_shapes
        propagate_shapes(gm, tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,))
    rows = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        out = _node_shape(node)
        if out is None:
            continue
        if isinstance(m, DynamicGroupConv2d):
            ins = [_node_shape(a) for a in node.args if isinstance(a, fx.Node)]
            rows.append({"layer": node.target, "kind": "dgc", **dgc_layer_cost(m, ins, out)})
        elif isinstance(m, nn.Conv2d):
            macs = math.prod(out) * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            rows.append({"layer": node.target, "kind": "conv", "macs": macs, "dense_macs": macs})
        elif isinstance(m, nn.Linear):
            macs = math.prod(out) * m.in_features
            rows.append({"layer": node.target, "kind": "linear", "macs": macs, "dense_macs": macs})
    return rows


def dgc_cost_table(gm: fx.GraphModule, example_inputs: tuple | None = None, fmt: str = "github") -> str:
    """A table of dense vs dynamic MACs per layer, with totals (see :func:`dgc_cost_rows`)."""
    from tabulate import tabulate
    from graphsel.pipeline.report import human
    rows = dgc_cost_rows(gm, example_inputs)
    table = [[r["layer"], r["kind"], human(r["dense_macs"]), human(r["macs"]),
              f"{r['kept_fraction']:.3f}" if "kept_fraction" in r else "1",
              human(r.get("saliency_macs", 0))] for r in rows]
    dense, dyn = sum(r["dense_macs"] for r in rows), sum(r["macs"] for r in rows)
    table.append(["total", "", human(dense), human(dyn), f"{dyn / dense:.3f}" if dense else "-", ""])
    return tabulate(table, headers=["layer", "kind", "dense MACs", "dynamic MACs", "kept", "saliency MACs"],
                    tablefmt=fmt)


register_module_cost(DynamicGroupConv2d, dgc_macs)


# ================================================================================================
# The pass
# ================================================================================================

_ABSORB = Pattern(BATCHNORM2D, RELU, CONV2D)
Selector = Callable[[str, nn.Conv2d], bool]


def _as_selector(value: Any, option: str) -> tuple[frozenset[str] | None, Selector | None]:
    if value is None:
        return None, None
    if isinstance(value, str):
        return frozenset([value]), None
    if callable(value):
        return None, value
    if isinstance(value, Iterable):
        items = list(value)
        bad = [v for v in items if not isinstance(v, str)]
        if bad:
            raise TypeError(f"ApplyDynamicGroupConv: {option} must hold module paths (str), got {bad[0]!r}")
        return frozenset(items), None
    raise TypeError(f"ApplyDynamicGroupConv: {option} must be a module path, a list of paths or a predicate "
                    f"fn(path, conv) -> bool, got {type(value).__name__}")


@register_pass
class ApplyDynamicGroupConv(Pass):
    """Replace eligible ``nn.Conv2d`` layers by :class:`DynamicGroupConv2d` (``dynamic_group_conv``).

    Contract: **exact** (saliency ≡ 1 via fc2 weight 0 / bias 1, k = 0, head i holds rows i::H of
    the conv's weight). With ``add_bn_relu=True`` (the authors' behaviour: every DGC layer normalises
    and rectifies its own input) convs without a preceding BN→ReLU get a fresh BatchNorm2d + ReLU,
    which changes the function: the contract is then **structural**.

    Eligible: plain ``nn.Conv2d`` (not a subclass with its own forward), groups = 1, C_in and C_out
    divisible by ``heads``, zero padding mode, called at one place. A preceding
    ``BatchNorm2d → ReLU`` chain whose nodes feed only the next one is absorbed into the layer
    (``absorb_bn_relu``). Every skipped conv gets a diagnostic saying why; a conv the user named in
    ``include`` that cannot be converted is an error.

    Options: ``heads`` (H, default 4), ``ratio`` (ξ ∈ [0, 1), the target pruning rate stored in
    each layer; the schedule reaches it, see :func:`set_progress`), ``squeeze_rate`` (r, halved
    below 80 input channels), ``include`` / ``exclude`` (module paths, or a predicate
    ``fn(path, conv) -> bool``), ``add_bn_relu``, ``absorb_bn_relu``.
    """

    name = "dynamic_group_conv"
    contract = Contract.EXACT

    def __init__(self, heads: int = 4, ratio: float = 0.5, squeeze_rate: int = 16, include: Any = None,
                 exclude: Any = None, add_bn_relu: bool = False, absorb_bn_relu: bool = True):
        _check_heads(heads)
        _check_ratio(ratio)
        _check_squeeze(squeeze_rate)
        super().__init__(heads=heads, ratio=ratio, squeeze_rate=squeeze_rate, include=include, exclude=exclude,
                         add_bn_relu=add_bn_relu, absorb_bn_relu=absorb_bn_relu)
        self.heads, self.ratio, self.squeeze_rate = heads, float(ratio), squeeze_rate
        self.include_paths, self.include_fn = _as_selector(include, "include")
        self.exclude_paths, self.exclude_fn = _as_selector(exclude, "exclude")
        self.add_bn_relu, self.absorb_bn_relu = bool(add_bn_relu), bool(absorb_bn_relu)
        if self.add_bn_relu:
            self.contract = Contract.STRUCTURAL

    def _ineligible(self, gm: fx.GraphModule, node: fx.Node, conv: nn.Module) -> str | None:
        h = self.heads
        if type(conv).forward is not nn.Conv2d.forward:
            return f"is a {type(conv).__name__} (a Conv2d subclass with its own forward); DGC converts plain nn.Conv2d"
        if conv.groups != 1:
            return f"groups={conv.groups} (grouped or depthwise); DGC converts groups=1 convolutions"
        if conv.in_channels % h:
            return f"its {conv.in_channels} input channels are not divisible by heads={h}"
        if conv.out_channels % h:
            return f"its {conv.out_channels} output channels are not divisible by heads={h}"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r}; DGC supports zero padding only"
        if not conv.weight.is_floating_point():
            return f"its weight is {conv.weight.dtype}, not floating point"
        if call_count(gm, node.target) != 1:
            return f"the module is called at {call_count(gm, node.target)} places; DGC needs one call site"
        return None

    def _selected(self, path: str, conv: nn.Module) -> str | None:
        """None when the conv is a candidate, else why not (an info diagnostic)."""
        if self.include_paths is not None and path not in self.include_paths:
            return "not in include"
        if self.include_fn is not None and not self.include_fn(path, conv):
            return "the include predicate rejected it"
        if self.exclude_paths is not None and path in self.exclude_paths:
            return "excluded"
        if self.exclude_fn is not None and self.exclude_fn(path, conv):
            return "the exclude predicate selected it"
        return None

    def _check_include(self, gm: fx.GraphModule) -> None:
        if not self.include_paths:
            return
        called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        modules = dict(gm.named_modules())
        for path in sorted(self.include_paths):
            if path in called and isinstance(modules.get(path), nn.Conv2d):
                continue
            if path not in modules:
                import difflib
                convs = [p for p, m in modules.items() if isinstance(m, nn.Conv2d)]
                close = difflib.get_close_matches(path, convs, n=3)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                raise PassError(self.name, f"include names '{path}', which is not a module of the model.{hint}")
            what = type(modules[path]).__name__
            reason = "is never called in the traced graph" if path not in called else f"is a {what}, not a Conv2d"
            raise PassError(self.name, f"include names '{path}', which {reason}; DGC converts nn.Conv2d layers. "
                                       f"Remove it from include=.")

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        self._check_include(gm)
        diags: list[Diagnostic] = []
        layers: dict[str, dict] = {}
        absorbed = added = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            conv = gm.get_submodule(node.target)
            if not isinstance(conv, nn.Conv2d):
                continue
            path = node.target
            why_not = self._selected(path, conv)
            if why_not is not None:
                diags.append(Diagnostic(f"conv {why_not}", path, level="info"))
                continue
            reason = self._ineligible(gm, node, conv)
            if reason is not None:
                if self.include_paths is not None and path in self.include_paths:
                    raise PassError(self.name, f"include names '{path}', which cannot be converted: {reason}. "
                                               f"Remove it from include= or change heads=.")
                diags.append(Diagnostic(f"conv skipped: {reason}", path))
                continue
            norm, source, note = None, node.args[0], None
            if self.absorb_bn_relu:
                match = _ABSORB.match(node, gm)
                if match:
                    bn_node, relu_node = match.nodes[0], match.nodes[1]
                    bn = gm.get_submodule(bn_node.target)
                    if type(bn).forward is not nn.BatchNorm2d.forward:
                        note = f"preceding {type(bn).__name__} not absorbed (custom forward)"
                    elif call_count(gm, bn_node.target) != 1:
                        note = f"preceding BatchNorm '{bn_node.target}' not absorbed (called at several places)"
                    else:
                        norm, source = bn, bn_node.args[0]
                        node.args = (source,) + tuple(node.args[1:])
                        gm.graph.erase_node(relu_node)
                        gm.graph.erase_node(bn_node)
                        note = f"absorbed BatchNorm '{bn_node.target}' → ReLU"
                        absorbed += 1
            pre_relu = norm is not None
            if norm is None and self.add_bn_relu:
                norm = nn.BatchNorm2d(conv.in_channels, device=conv.weight.device, dtype=conv.weight.dtype)
                norm.train(conv.training)
                pre_relu = True
                note = "added BatchNorm2d → ReLU (function changed: add_bn_relu=True)"
                added += 1
            dgc = DynamicGroupConv2d.from_conv(conv, heads=self.heads, ratio=self.ratio,
                                               squeeze_rate=self.squeeze_rate, norm=norm, pre_relu=pre_relu)
            replace_module(gm, path, dgc)
            layers[path] = {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
                            "kernel_size": tuple(conv.kernel_size), "pre": note or "none"}
        converted = len(layers)
        if converted:
            delete_unused_modules(gm)
            gm.graph.lint()
            gm.recompile()
            graphsel_meta(gm).state[self.name] = {"heads": self.heads, "ratio": self.ratio,
                                                  "squeeze_rate": self.squeeze_rate, "layers": layers}
        else:
            diags.append(Diagnostic("no convolution converted: none is eligible (see the skipped ones)"
                                    if any(d.level == "skip" for d in diags) else
                                    "no convolution converted: the model has no nn.Conv2d selected", level="info"))
        stats = {"converted": converted, "absorbed_bn_relu": absorbed, "added_bn_relu": added,
                 "skipped": sum(d.level == "skip" for d in diags)}
        return PassResult(gm, modified=converted > 0, stats=stats, diagnostics=diags)
