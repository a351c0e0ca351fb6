"""Latency-aware channel allocation for ``prune(target_latency=..., runtime=...)``.

NetAdapt / HALP style: the widths are chosen by *importance lost per millisecond saved* on the
runtime the model will be deployed on, measured rather than counted in MACs.

1. **Layers.** Every ``Conv1d/2d/3d`` and ``Linear`` call with a recorded input shape is a layer;
   the channel analysis gives the class of each of its input and output positions, so its two
   widths follow from the classes removed (a concatenation's input spans several groups, a
   depthwise conv has one width).
2. **Table.** For every layer side a prunable group reaches, the layer is timed at the candidate
   widths of that side (:func:`graphsel.analysis.latency.grid_widths`: multiples of 8, coarser
   for wide layers) with the other side at full width, once per (operator shape, width), on the
   runtime (:class:`graphsel.analysis.latency.LatencyTable`, cached on disk). A layer's latency at
   widths (i, o) is estimated as ``t(I, O) · t(i, O)/t(I, O) · t(I, o)/t(I, O)`` (separable: the
   per-width efficiency of each side, e.g. multiples of 16 being fast, is kept; a width between
   candidates, such as a concatenation's input, counts as the next wider candidate). The model's
   latency is estimated as its measured dense latency minus the table's savings.
3. **Greedy.** Starting from the dense model, each step removes, from one group, the next
   lowest-scoring classes down to one of the next candidate widths (a window of at least four
   grid steps or a quarter of the group): the (group, width) pair with the least importance lost
   per millisecond saved (scores of any criterion, normalised per group as in
   ``scope="global"``; every group keeps at least :data:`MIN_KEEP` of its channels, so that
   no layer becomes a one-channel bottleneck). A width where the latency does not drop is never a stopping point, so
   the widths kept lie on the lower envelope of each group's latency curve: the table, not a
   fixed ``round_to``, sets the granularity. It stops when the estimate reaches the target.
4. **Measure and correct.** The pruned model is built (``fold_masks`` + ``materialize`` on a copy)
   and timed end to end on the runtime; when it misses the target by more than 10 % the target
   of the estimate is rescaled by estimated / measured and the allocation repeated (at most
   :data:`MAX_ATTEMPTS` times in all); the attempt closest to the target is kept. Target,
   estimate and measurement go into the pass's statistics and diagnostics.
"""
from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.fx as fx
import torch.nn as nn

from graphsel.analysis.channels import ChannelAnalysis, ChannelGroup
from graphsel.analysis.latency import (LatencyTable, LayerShape, RuntimeUnavailable, check_runtime_name, grid_widths,
                                       runtime_unavailable)
from graphsel.analysis.masks import add_group_mask, removal_positions
from graphsel.errors import ExampleInputError, GraphselError
from graphsel.ir.graph import module_index
from graphsel.pipeline.context import PassContext
from graphsel.pipeline.passbase import Diagnostic

TOLERANCE = 0.10          # target met when |measured - target| <= 10 % of the target
MAX_ATTEMPTS = 4          # allocations (each measured end to end), the first one included
MIN_KEEP = 0.125          # every group keeps at least this fraction of its channels
FINISH_BAND = 0.05        # the last step aims within 5 % of the estimate's target
_TARGET_HELP = ("target_latency must be a fraction in (0, 1) of the dense model's latency measured on the runtime "
                "(0.5: twice as fast) or milliseconds as a string such as '12ms'")


def parse_target_latency(value: Any) -> tuple[str, float]:
    """``0.5`` → ``("fraction", 0.5)``; ``"12ms"`` / ``"12.5 ms"`` → ``("ms", 12.5)``; else ValueError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if 0 < value < 1:
            return "fraction", float(value)
        raise ValueError(f"{_TARGET_HELP}; got {value!r}" + (" (a number >= 1 would be ambiguous: write milliseconds "
                                                             f"as '{value}ms')" if value >= 1 else ""))
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*ms\s*", value)
        if m and float(m.group(1)) > 0:
            return "ms", float(m.group(1))
    raise ValueError(f"{_TARGET_HELP}; got {value!r}")


def make_table(runtime: Any) -> LatencyTable:
    """A runtime name → a :class:`LatencyTable` with the default cache; a table is used as is."""
    if isinstance(runtime, LatencyTable):
        return runtime
    return LatencyTable(check_runtime_name("eager" if runtime is None else runtime))


# ================================================================================================
# layers

@dataclass
class LatencyLayer:
    """A conv/linear call as the allocator sees it: its shape at full width and, per side
    (``"in"``, ``"out"``, or ``"chan"`` for a depthwise conv), the class of every position."""
    path: str
    node: str
    shape: LayerShape
    sides: dict[str, np.ndarray]


def latency_layers(gm: fx.GraphModule, a: ChannelAnalysis) -> list[LatencyLayer]:
    """Every Conv1d/2d/3d and Linear call of ``gm`` whose input shape is recorded."""
    modules = module_index(gm)
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        m = modules.get(n.target)
        if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        x = n.args[0] if n.args else None
        tm = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
        if tm is None or not hasattr(tm, "shape"):
            continue
        shape = LayerShape.of_module(m, tuple(tm.shape))
        sides = {}
        for side in (("chan",) if shape.depthwise else ("in", "out")):
            slot = a.slots.get(("module", n.target, side))
            if slot is not None and slot.ids:
                sides[side] = a.class_of(slot.ids[0])
        out.append(LatencyLayer(n.target, n.name, shape, sides))
    return out


# ================================================================================================
# the allocator

@dataclass
class _Side:
    length: int
    cum: dict[int, np.ndarray]                 # group index -> positions among its first r removed classes
    grid: np.ndarray | None = None             # widths measured (ascending)
    ratio: np.ndarray | None = None            # latency at each width / latency at full width


def _at(side: _Side, width: int) -> float:
    """The side's latency ratio at ``width``: measured on the grid; between grid widths (a
    concatenation's input, a sum over groups) that of the next wider grid width, as kernels
    process channels in blocks."""
    i = min(int(np.searchsorted(side.grid, width, side="left")), len(side.grid) - 1)
    return float(side.ratio[i])


@dataclass
class Allocation:
    """The allocator's answer: classes to remove per group index, the estimate, kept widths."""
    selection: dict[int, list[int]]
    estimated_ms: float
    reached: bool
    kept: dict[int, int] = field(default_factory=dict)
    steps: int = 0


class LatencyAllocator:
    """Chooses per-group widths by importance lost per millisecond saved (module docstring).

    ``groups`` / ``scores``: the prunable groups and their per-class scores (higher = more
    important); ``layers``: from :func:`latency_layers`; ``table``: the runtime's latency table
    (measured here for every candidate width); ``dense_ms``: the measured latency of the dense
    model (the estimate's anchor)."""

    def __init__(self, a: ChannelAnalysis, groups: list[ChannelGroup], scores: dict[int, np.ndarray],
                 layers: list[LatencyLayer], table: LatencyTable, dense_ms: float, *, min_channels: int = 1,
                 base: int = 8):
        self.groups = {g.index: g for g in groups}
        self.base = base
        n = a.n_classes + 1
        grp = np.full(n, -1, dtype=np.int64)
        rank = np.full(n, -1, dtype=np.int64)
        self.order: dict[int, np.ndarray] = {}
        self.rmax: dict[int, int] = {}
        self.imp: dict[int, np.ndarray] = {}
        for g in groups:
            s = np.asarray(scores[g.index], dtype=np.float64)
            norm = s / (s.mean() + 1e-12) if len(s) else s
            cls = np.asarray(g.classes, dtype=np.int64)
            pick = np.isin(cls, np.asarray(g.prunable_classes, dtype=np.int64))
            order = np.lexsort((cls[pick], norm[pick]))
            self.order[g.index] = cls[pick][order]
            frozen = g.size - int(pick.sum())
            keep_min = max(min_channels, frozen, 1, int(math.ceil(MIN_KEEP * g.size)))
            self.rmax[g.index] = max(0, min(int(pick.sum()), g.size - keep_min))
            self.imp[g.index] = np.concatenate([[0.0], np.cumsum(norm[pick][order])])
            grp[self.order[g.index]] = g.index
            rank[self.order[g.index]] = np.arange(len(order))
        self.layers: list[LatencyLayer] = []
        self.sides: list[dict[str, _Side]] = []
        self.layers_of: dict[int, list[int]] = {g.index: [] for g in groups}
        for L in layers:
            sides = {}
            for name, cls in L.sides.items():
                valid = cls >= 0
                gi = np.where(valid, grp[np.where(valid, cls, -1)], -1)
                cum = {}
                for g in np.unique(gi[gi >= 0]).tolist():
                    r = rank[cls[gi == g]]
                    counts = np.bincount(r, minlength=self.rmax[g] + 1)[: self.rmax[g]]
                    cum[g] = np.concatenate([[0], np.cumsum(counts)])
                sides[name] = _Side(len(cls), cum)
            if not any(s.cum for s in sides.values()):
                continue
            li = len(self.layers)
            self.layers.append(L)
            self.sides.append(sides)
            for s in sides.values():
                for g in s.cum:
                    if li not in self.layers_of[g]:
                        self.layers_of[g].append(li)
        self.groups_of = [sorted({g for s in sides.values() for g in s.cum}) for sides in self.sides]
        self._measure(table)
        self.table_full_ms = sum(self.full)
        self.set_dense(dense_ms)

    def set_dense(self, dense_ms: float) -> None:
        """Anchor the estimate on the dense model's measured latency."""
        self.dense_ms = dense_ms
        self.base_ms = dense_ms - self.table_full_ms

    # -- the table ----------------------------------------------------------------------------------
    def _side_grid(self, L: LatencyLayer, side: _Side) -> list[int]:
        low = side.length - sum(int(c[-1]) for c in side.cum.values())
        grid = grid_widths(side.length, low=max(1, low), base=self.base)
        g = L.shape.groups
        if g > 1 and not L.shape.depthwise:
            grid = sorted({max(g, int(round(w / g)) * g) for w in grid})
        return grid

    def _measure(self, table: LatencyTable) -> None:
        shapes: list[LayerShape] = []
        plan: list[tuple[int, str, list[int]]] = []
        for li, (L, sides) in enumerate(zip(self.layers, self.sides)):
            full = L.shape.with_batch(table.batch)
            shapes.append(full)
            for name, side in sides.items():
                if not side.cum:
                    continue
                grid = self._side_grid(L, side)
                plan.append((li, name, grid))
                for w in grid:
                    if name == "chan":
                        shapes.append(full.resized(w, w))
                    elif name == "in":
                        shapes.append(full.resized(w, full.out_channels))
                    else:
                        shapes.append(full.resized(full.in_channels, w))
        ms = table.measure(shapes, desc=f"latency table ({table.layer_runtime}, {len(self.layers)} layers)")
        at = dict(zip((s.key() for s in shapes), ms))
        self.full = [max(at[L.shape.with_batch(table.batch).key()], 1e-6) for L in self.layers]
        for li, name, grid in plan:
            L = self.layers[li]
            full = L.shape.with_batch(table.batch)
            vals = []
            for w in grid:
                s = full.resized(w, w) if name == "chan" else (
                    full.resized(w, full.out_channels) if name == "in" else full.resized(full.in_channels, w))
                vals.append(at[s.key()] / self.full[li])
            side = self.sides[li][name]
            side.grid = np.asarray(grid, dtype=np.float64)
            side.ratio = np.asarray(vals, dtype=np.float64)

    # -- estimates ----------------------------------------------------------------------------------
    def _width(self, side: _Side, r: dict[int, int]) -> int:
        return side.length - sum(int(c[r[g]]) for g, c in side.cum.items())

    def layer_ms(self, li: int, r: dict[int, int]) -> float:
        t = self.full[li]
        for side in self.sides[li].values():
            if side.grid is None:
                continue
            t *= _at(side, self._width(side, r))
        return t

    def estimate(self, r: dict[int, int]) -> float:
        return self.base_ms + sum(self.layer_ms(li, r) for li in range(len(self.layers)))

    def group_grid(self, gi: int) -> list[int]:
        g = self.groups[gi]
        return grid_widths(g.size, low=g.size - self.rmax[gi], base=self.base)

    # -- greedy -------------------------------------------------------------------------------------
    def _best_move(self, gi: int, r: dict[int, int], cur: list[float]):
        size, rg = self.groups[gi].size, r[gi]
        kept = size - rg
        grid = self.group_grid(gi)
        step = (grid[-1] - grid[-2]) if len(grid) > 1 else 1
        window = max(4 * step, size // 4)
        best = None
        for k in reversed(grid):
            if k >= kept:
                continue
            if k < kept - window and best is not None:
                break
            r2 = size - k
            if r2 > self.rmax[gi]:
                break
            trial = dict(r)
            trial[gi] = r2
            new = {li: self.layer_ms(li, trial) for li in self.layers_of[gi]}
            saved = sum(cur[li] - t for li, t in new.items())
            if saved <= 1e-9:
                continue
            ratio = (self.imp[gi][r2] - self.imp[gi][rg]) / saved
            if best is None or ratio < best[0] - 1e-12:
                best = (ratio, r2, saved, new)
        return best

    def _finish(self, r: dict[int, int], cur: list[float], est: float, target_ms: float):
        """The last step. Per group, the narrowest removal that brings the estimate to the target;
        of those landing within ``FINISH_BAND`` below the target, the one losing least importance,
        else the one overshooting least. Returns ``(group, r, saved, new layer times)``, or None to
        stop where we are: just above the target and closer to it than any such move."""
        moves = []
        for gi in self.groups:
            size, rg = self.groups[gi].size, r[gi]
            for k in reversed(self.group_grid(gi)):
                r2 = size - k
                if r2 <= rg:
                    continue
                if r2 > self.rmax[gi]:
                    break
                trial = dict(r)
                trial[gi] = r2
                new = {li: self.layer_ms(li, trial) for li in self.layers_of[gi]}
                saved = sum(cur[li] - t for li, t in new.items())
                if est - saved <= target_ms:
                    moves.append((self.imp[gi][r2] - self.imp[gi][rg], est - saved, gi, r2, saved, new))
                    break
        if not moves:
            return None
        close = [m for m in moves if m[1] >= target_ms * (1 - FINISH_BAND)]
        best = min(close, key=lambda m: m[0]) if close else max(moves, key=lambda m: m[1])
        if not close and est - target_ms < target_ms - best[1] and est <= target_ms * (1 + FINISH_BAND):
            return None
        return best[2:]

    def allocate(self, target_ms: float) -> Allocation:
        """Remove classes until the estimate is at most ``target_ms`` (or nothing saves time)."""
        r = {gi: 0 for gi in self.groups}
        cur = [self.layer_ms(li, r) for li in range(len(self.layers))]
        est = self.base_ms + sum(cur)
        moves: dict[int, Any] = {}
        stale = set(self.groups)
        steps = 0
        while est > target_ms:
            for gi in stale:
                moves[gi] = self._best_move(gi, r, cur)
            stale = set()
            cands = [(m[0], gi) for gi, m in moves.items() if m is not None]
            if not cands:
                break
            _, gi = min(cands)
            _, r2, saved, new = moves[gi]
            if est - saved <= target_ms:
                # the last step (the best ratio may overshoot by a whole window)
                last = self._finish(r, cur, est, target_ms)
                if last is None:
                    break
                gi, r2, saved, new = last
            r[gi] = r2
            for li, t in new.items():
                cur[li] = t
            est -= saved
            steps += 1
            for li in self.layers_of[gi]:
                stale.update(self.groups_of[li])
        selection = {gi: self.order[gi][:rg].tolist() for gi, rg in r.items() if rg > 0}
        kept = {gi: self.groups[gi].size - rg for gi, rg in r.items()}
        est = self.base_ms + sum(cur)
        return Allocation(selection, est, est <= target_ms * (1 + FINISH_BAND), kept, steps)


# ================================================================================================
# the pass's part: measure, allocate, build, measure, correct

def _next_fraction(history: list[tuple[float, float, float]]) -> float | None:
    """The estimate's next target (a fraction of the dense anchor) from the attempts so far:
    ``(fraction tried, measured fraction, wanted fraction)``."""
    fast = [h for h in history if h[1] < h[2]]                 # pruned too much: aim higher
    slow = [h for h in history if h[1] > h[2]]                 # pruned too little: aim lower
    if fast and slow:
        lo, hi = max(h[0] for h in fast), min(h[0] for h in slow)
        return math.sqrt(lo * hi) if lo < hi else None
    f, got, want = history[-1]
    if fast:
        return min(0.999, max(h[0] for h in fast) * min(2.0, max(1.05, want / got)))
    return min(h[0] for h in slow) * max(0.5, min(0.95, want / got))


def _slim_copy(gm: fx.GraphModule, ctx: PassContext, a: ChannelAnalysis, removed: set[int], owner) -> fx.GraphModule:
    """A materialised copy of ``gm`` without the classes ``removed`` (``gm`` is not touched)."""
    from graphsel.pipeline.phases import copy_for_pass

    from .fold_masks import FoldMasks
    from .materialize import Materialize

    work = copy_for_pass(gm, owner)
    for src, positions in removal_positions(a, removed).items():
        add_group_mask(work, src, positions)
    local = PassContext(ctx.example_inputs)
    local.invalidate(work)
    FoldMasks()(work, local)
    return Materialize()(work, local).gm


def latency_aware_selection(owner, gm: fx.GraphModule, ctx: PassContext, a: ChannelAnalysis,
                            groups: list[ChannelGroup], scores: dict[int, np.ndarray], spare) -> tuple[
                                dict[int, list[int]], dict[str, Any], list[Diagnostic]]:
    """The selection of ``Prune`` with ``target_latency``: per group index, the classes to remove;
    statistics and diagnostics. ``spare(selection) -> selection``: the pass's vanishing-tensor rule."""
    table = make_table(owner.runtime)
    if table.timer is None or table.model_timer is None:
        why = runtime_unavailable(table.runtime)
        if why:
            raise RuntimeUnavailable(table.runtime, why + "; or pick another runtime= (eager always works)")
    if ctx.example_inputs is None:
        raise ExampleInputError("prune(target_latency=...) measures the model: trace it with example inputs "
                                "(graphsel.transform(model, passes, example_inputs)) at the deployment input shape")
    t0 = time.perf_counter()
    kind, value = parse_target_latency(owner.target_latency)
    prepared: dict = {}                              # the dense model is exported / compiled once
    dense_ms = table.measure_models({"dense": gm}, ctx.example_inputs, prepared)["dense"]
    layers = latency_layers(gm, a)
    alloc = LatencyAllocator(a, groups, scores, layers, table, dense_ms, min_channels=owner.min_channels)
    diags: list[Diagnostic] = []
    if not alloc.layers:
        raise GraphselError("prune(target_latency=...): no conv or linear layer of a prunable group has a recorded "
                            "input shape, so there is nothing to time; use ratio= or target_macs= instead")
    # Every attempt times the dense and the pruned model interleaved; target and error are taken
    # relative to that attempt's dense time (for a fraction target), so that drift between
    # measurements does not enter. The estimate's target is a fraction f of the dense anchor; as
    # the measured fraction grows with f, later attempts bracket the target (too fast: f grows,
    # too slow: f shrinks; geometric bisection once bracketed).
    attempts: list[dict[str, Any]] = []
    f = value if kind == "fraction" else value / dense_ms
    tried: list[dict[int, list[int]]] = []
    history: list[tuple[float, float, float]] = []          # (f, measured fraction, wanted fraction)
    best = None
    for i in range(MAX_ATTEMPTS):
        internal = f * alloc.dense_ms
        res = alloc.allocate(internal)
        tried.append(res.selection)
        selection = spare(res.selection)
        removed = {c for cs in selection.values() for c in cs}
        slim = _slim_copy(gm, ctx, a, removed, owner)
        prepared.pop("pruned", None)
        t = table.measure_models({"dense": gm, "pruned": slim}, ctx.example_inputs, prepared)
        dense_i, measured = t["dense"], t["pruned"]
        target_i = value * dense_i if kind == "fraction" else value
        err = (measured - target_i) / target_i
        rec = {"attempt": i + 1, "estimate_target_ms": round(internal, 4), "estimated_ms": round(res.estimated_ms, 4),
               "dense_ms": round(dense_i, 4), "target_ms": round(target_i, 4), "measured_ms": round(measured, 4),
               "error": round(err, 4), "reached": res.reached}
        attempts.append(rec)
        if best is None or abs(err) < abs(best[0]):
            best = (err, selection, res, measured, rec)
        if abs(err) <= TOLERANCE or measured <= 0 or dense_i <= 0:
            break
        got, want = measured / dense_i, target_i / dense_i
        if not res.reached and got > want:
            break                                      # nothing left that saves time
        history.append((f, got, want))
        nxt = _next_fraction(history)
        if nxt is None or alloc.allocate(nxt * alloc.dense_ms).selection in tried:
            break                                      # no other model to try
        f = nxt
    err, selection, res, measured, rec = best
    target_ms, dense_ms = rec["target_ms"], rec["dense_ms"]
    met = abs(err) <= TOLERANCE
    widths = {}
    for gi, k in res.kept.items():
        g = alloc.groups[gi]
        if k < g.size:
            widths[g.sources[0]] = [k, g.size]
    stats = {
        "runtime": table.runtime, "threads": table.threads, "batch": table.batch,
        "target_ms": round(target_ms, 4), "dense_ms": round(dense_ms, 4), "estimated_ms": round(res.estimated_ms, 4),
        "measured_ms": round(measured, 4), "target_met": met, "tolerance": TOLERANCE, "attempts": attempts,
        "widths": widths, "layers_timed": len(alloc.layers), "table": table.info(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    del prepared
    goal = f"{value:g} of the dense {dense_ms:.3g} ms" if kind == "fraction" else f"{value:g} ms"
    line = (f"latency-aware on {table.runtime}: target {target_ms:.3g} ms ({goal}); estimated {res.estimated_ms:.3g} ms, "
            f"measured {measured:.3g} ms ({err:+.1%}) after {len(attempts)} attempt(s)")
    diags.append(Diagnostic(line + ("" if met else f": outside ±{TOLERANCE:.0%}"), level="info" if met else "warning"))
    if not res.reached:
        diags.append(Diagnostic("the estimate could not reach the target: every group is at its minimum width or no "
                                "removal saves time on this runtime", level="warning"))
    return selection, stats, diags


__all__ = ["LatencyAllocator", "LatencyLayer", "Allocation", "latency_layers", "latency_aware_selection",
           "parse_target_latency", "make_table", "TOLERANCE", "MAX_ATTEMPTS"]
