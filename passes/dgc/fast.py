"""The fast inference path of :class:`~.module.DynamicGroupConv2d` (eval mode, no autograd).

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
"""
from __future__ import annotations

import math
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .ranking import _exporting, _rank


class _Static(NamedTuple):
    """Per-layer constants of the fast path (see :meth:`DynamicGroupConv2d._static`)."""
    key: tuple
    plan: str                                  # "pointwise" | "transpose" | "strided"
    tpad: tuple[int, int] | None               # padding of the equivalent transposed conv
    head_base: torch.Tensor                    # H × 1: i·C_in, row offset of head i in the weight rows


class _FastPath:
    """The gathered fast path, mixed into :class:`~.module.DynamicGroupConv2d` (it reads the
    layer's geometry, ``weight``, ``bias`` and caches, and calls its ``_interleave``)."""

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
