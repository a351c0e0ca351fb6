"""Global-threshold gating: the saliency library, the calibration of T and the measured pruning rates.

Global threshold (paper 002 supplement, eq. 1–2). The supplement drops the generator's last
ReLU to keep signed saliencies and prunes ``|g| < T``; :func:`use_global_threshold` does the
same by default (``signed=False`` keeps the ReLU). T is chosen on a window of saliencies (the
"saliency library") so that a fraction ξ of all saliency entries of all layers and heads is
below it, then frozen in a buffer like BatchNorm statistics. Because pruning in one layer
changes the saliencies downstream, :func:`calibrate_global_threshold` re-collects with T in
effect and refines it (``refine`` rounds), so the pruning rate measured on the calibration data
meets ξ. Under ``torch.export`` a global-threshold layer gathers all C_in channels (the kept
count is data dependent) and masks the pruned ones: exact, but without the speed-up.

Under torch.distributed (``process_group``; default: the default group when initialised, see
:mod:`graphsel.distributed`) every rank holds the saliencies of its own data, and T is the
threshold of their union: the two order statistics at the cut are found by counting over the
ranks (exact, without gathering the saliencies), the measured rates and kept fractions are
all-reduced counts. Every rank gets the T a single process computes on all the ranks' data.
"""
from __future__ import annotations

from collections import deque
from typing import Any

import torch
import torch.nn as nn

from graphsel import distributed as gd

from .module import _check_ratio, _require_dgc


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

    def threshold(self, ratio: float, *, process_group=None) -> float:
        """T such that a fraction ``ratio`` of G lies below it (midway between the neighbours at the
        cut, so the fraction is exact when they differ); under torch.distributed, of the union of
        every rank's G (module docstring)."""
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
        group = gd.resolve_group(process_group)
        if group is not None:       # a rank may have collected nothing; the union must not be empty
            local = [t.reshape(-1) for d in self.entries.values() for t in d]
            return _union_threshold(torch.cat(local) if local else torch.zeros(0), float(ratio), group)
        v = torch.sort(self.values().double()).values
        m = int(round(float(ratio) * v.numel()))
        if m <= 0:
            return 0.0
        return float((v[m - 1] + v[m]) / 2) if m < v.numel() else float(v[-1]) * (1 + 1e-6) + 1e-12

    def pruning_rates(self, threshold: float, *, process_group=None) -> dict[str, float]:
        """Per layer: the fraction of collected |g| below ``threshold`` (over every rank's)."""
        group = gd.resolve_group(process_group)
        if group is None:
            out = {}
            for path, d in self.entries.items():
                if d:
                    t = torch.cat([x.reshape(-1) for x in d])
                    out[path] = float((t < threshold).double().mean())
            return out
        sums = []                                   # per layer: entries below, entries
        for d in self.entries.values():
            sums += [float(sum(int((x < threshold).sum()) for x in d)), float(sum(x.numel() for x in d))]
        sums = gd.sum_over(sums, group, what="SaliencyLibrary.pruning_rates")
        return {path: sums[2 * i] / sums[2 * i + 1] for i, path in enumerate(self.entries) if sums[2 * i + 1] > 0}


def _union_threshold(values: torch.Tensor, ratio: float, group) -> float:
    """:meth:`SaliencyLibrary.threshold` of the union of every rank's ``values``, by counting."""
    what = "the global threshold (calibrate_global_threshold)"
    n = int(gd.sum_over([values.numel()], group, what=what)[0])
    if n == 0:
        raise ValueError("the saliency library is empty on every rank: run forward passes of the model while the "
                         "library is open, or give calibrate_global_threshold data")
    m = int(round(ratio * n))
    if m <= 0:
        return 0.0
    if m < n:
        below, above = gd.order_statistics(values, [m - 1, m], group, what=what)
        return (below + above) / 2
    top, = gd.order_statistics(values, [n - 1], group, what=what)
    return top * (1 + 1e-6) + 1e-12


def _fraction_below(values: torch.Tensor, t: float, group) -> float:
    if group is None:
        return float((values < t).double().mean())
    below, total = gd.sum_over([float((values < t).sum()), values.numel()], group,
                               what="the global threshold's measured rate (calibrate_global_threshold)")
    return below / total


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
                               signed: bool = True, process_group=None) -> float:
    """Choose the global threshold T, store it in every DGC layer and switch them to global gating.

    From ``library`` (saliencies collected during training, the paper's way): T is the
    ``ratio``-percentile of the library. From ``data`` (an iterable of input tensors or
    (inputs, labels) batches; ``max_batches`` caps it): the model runs in eval mode without grad
    with global gating on, T is taken from the collected saliencies and refined ``refine`` times
    with T in effect (pruning shifts downstream saliencies), keeping the T whose measured rate
    on the data is closest to ``ratio``. ``ratio`` defaults to the layers' scheduled ξ (see
    :func:`set_progress`). Each layer's ``keep_fraction`` buffer records its measured kept
    fraction per head (for the cost model). Returns T.

    Under torch.distributed (``process_group``, default: the default group when initialised) each
    rank gives its own library or data, and every rank gets the T of their union (module docstring).
    """
    mods = _require_dgc(model, "calibrate_global_threshold")
    group = gd.resolve_group(process_group)
    if ratio is None:
        ratio = _default_ratio(mods)
    _check_ratio(ratio)
    if library is None and data is None:
        raise ValueError("calibrate_global_threshold needs data: pass data=<iterable of batches> or "
                         "library=<SaliencyLibrary filled during training>")
    if library is not None:
        t = library.threshold(ratio, process_group=group)
        use_global_threshold(model, signed=signed, threshold=t)
        _store_keep_fractions(mods, {p: list(d) for p, d in library.entries.items()}, t, group)
        return t
    batches = _batches(data, max_batches)
    if not batches:
        raise ValueError("calibrate_global_threshold: the calibration data holds no batch; give at least one")
    from graphsel.pipeline.verify import eval_mode
    use_global_threshold(model, signed=signed, threshold=0.0)
    best: tuple[float, float, dict] | None = None
    with torch.no_grad(), eval_mode(model):
        t = _collect(model, batches).threshold(ratio, process_group=group)    # nothing pruned yet
        for _ in range(max(0, int(refine)) + 1):
            for _, m in mods:
                m.set_threshold(t)
            lib = _collect(model, batches)                     # saliencies with T in effect
            err = abs(_fraction_below(lib.values(), t, group) - ratio)
            if best is None or err < best[1]:
                best = (t, err, {p: list(d) for p, d in lib.entries.items()})
            if err < 1e-4:
                break
            t = lib.threshold(ratio, process_group=group)
    for _, m in mods:
        m.set_threshold(best[0])
    _store_keep_fractions(mods, best[2], best[0], group)
    return best[0]


def _collect(model: nn.Module, batches: list) -> SaliencyLibrary:
    lib = SaliencyLibrary(model, window=len(batches))
    try:
        for b in batches:
            _run_batch(model, b)
    finally:
        lib.close()
    return lib


def _store_keep_fractions(mods, entries: dict[str, list], t: float, group=None) -> None:
    if group is None:
        for path, m in mods:
            batches = entries.get(path) or []
            if batches:
                g = torch.cat([b.reshape(-1, m.heads, m.in_channels) for b in batches])
                m.keep_fraction.copy_((g >= t).double().mean(dim=(0, 2)).to(m.keep_fraction.dtype))
        return
    counts = []                              # per layer and head: entries kept; then entries per head
    for path, m in mods:
        g = [b.reshape(-1, m.heads, m.in_channels) for b in entries.get(path) or []]
        kept = sum(((x >= t).sum(dim=(0, 2)).double() for x in g), torch.zeros(m.heads, dtype=torch.float64))
        counts.append(torch.cat([kept, torch.tensor([float(sum(x.shape[0] * x.shape[2] for x in g))],
                                                    dtype=torch.float64)]))
    total = gd.all_reduce_sum(torch.cat(counts), group, what="the kept fractions (calibrate_global_threshold)")
    for (_, m), part in zip(mods, total.split([m.heads + 1 for _, m in mods])):
        if part[-1] > 0:
            m.keep_fraction.copy_((part[:-1] / part[-1]).to(m.keep_fraction.dtype))


def pruning_rates(model: nn.Module) -> dict[str, float]:
    """Per DGC layer: the fraction of input channels pruned in the last forward, averaged over
    samples and heads (the paper's Fig. 2)."""
    out = {}
    for path, m in _require_dgc(model, "pruning_rates"):
        if m.last_kept is None:
            raise RuntimeError(f"pruning_rates: layer '{path}' has not run yet; run a forward pass first")
        out[path] = 1.0 - float(m.last_kept.double().mean()) / m.in_channels
    return out
