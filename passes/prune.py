"""Prune (``prune``): choose channels to remove and record them as group masks.

Contract: structural (the masked model differs by design); reports what it removed. Follow it
with ``fold_masks`` and ``materialize`` to obtain a physically smaller graph.

Channels are removed by *class* (everything coupled to a channel goes with it: the other
operands of a residual add, the matching slice of a concat, the depthwise conv after it), within
the prunable groups of :mod:`graphsel.channels`. Frozen groups (model inputs/outputs, opaque
modules, unknown ops) are never touched; the diagnostics say why they are frozen.

Criteria (``criterion=``), each giving one score per class, higher = more important:

* ``"l1"``: L1 norm of the producing filters (all sources of the class summed);
* ``"bn_gamma"``: |γ| of the BatchNorm layers on the class (network slimming); groups without
  BatchNorm fall back to ``"l1"`` (reported);
* ``"ecdm"``: **group ECDM** — the expected channel damage of the selective-convolution paper
  generalised to a whole group: for every consumer that reads the class, the expected change of
  each of its outputs when the channel is removed, ``E[x_c] · Σ_k W[j, c, k]``, normalised per
  output as in the paper; the class score is the worst case over consumers and outputs. ``E[x_c]``
  comes from the Gaussian model of the BatchNorm feeding the consumer (``|γ|φ(β/|γ|) + βΦ(β/|γ|)``
  after a ReLU, ``β`` without one) or, where no BatchNorm is on the path, from the mean activation
  on the example inputs;
* a callable ``f(group, analysis, gm) -> sequence of scores`` (one per class of the group).

Amount: ``ratio`` (fraction of prunable channels, in [0, 1)), ``ratios`` (per module path: the
group produced by that module uses its own ratio) or ``target_macs`` (an absolute MAC count, or a
fraction < 1 of the current MACs: the global ratio is found by bisection on the estimated cost).
``scope="global"`` ranks normalised scores across groups; ``"uniform"`` removes the same
fraction of every group. ``round_to=k`` keeps every pruned group at a multiple of k channels
(the fast sizes for CPU and GPU kernels).

Latency (``target_latency``, with ``runtime``): instead of a ratio, a latency to reach on a
deployment runtime: a fraction in (0, 1) of the dense model's latency measured there (0.5: twice
as fast) or milliseconds as a string (``"12ms"``). ``runtime``: ``"eager"`` (default),
``"inductor"``, ``"aoti"``, ``"onnxruntime"``, or a :class:`graphsel.analysis.latency.LatencyTable`
(its runtime, threads, batch size and cache directory). The widths are chosen from per-layer latency
tables measured on that runtime by importance lost per millisecond saved, the result is measured
end to end and corrected toward the target (:mod:`graphsel.passes.prune_latency`); the statistics
report target, estimate and measurement. Latencies are measured at the example inputs' shapes
unless the table sets ``batch``. ``scope``, ``ratio``, ``ratios``, ``target_macs`` and
``round_to`` do not apply. Module selection as in every pass
(:class:`graphsel.pipeline.select.ModuleSelection`): ``include`` — only groups produced by a
selected module are pruned; ``exclude`` — groups that an excluded module produces or reads stay
intact.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from graphsel.analysis.activations import relu_gaussian_mean
from graphsel.analysis.channels import ChannelAnalysis, ChannelGroup
from graphsel.analysis.masks import add_group_mask, removal_positions, vanishing_tensors
from graphsel.ir.graph import module_index
from graphsel.pipeline.passbase import Contract, Diagnostic, Pass, PassResult
from graphsel.pipeline.registry import register_pass
from graphsel.pipeline.select import ModuleSelection
from graphsel.pipeline.verify import eval_mode

CRITERIA = ("l1", "bn_gamma", "ecdm")


def _spare_vanishing_tensors(a: ChannelAnalysis, groups: list[ChannelGroup], scores: dict[int, np.ndarray],
                             selection: dict[int, list[int]]) -> dict[int, list[int]]:
    """Take back, for every tensor the selection would empty (one piece of a split or chunk, say),
    its highest-scoring removed class, until no tensor is empty."""
    score_of: dict[int, tuple[float, int]] = {}
    selection = {gi: list(cs) for gi, cs in selection.items()}
    while True:
        removed = {c for cs in selection.values() for c in cs}
        gone = vanishing_tensors(a, removed)
        if not gone:
            return selection
        if not score_of:
            score_of = {c: (float(scores[g.index][i]), g.index) for g in groups for i, c in enumerate(g.classes)}
        _, cls = gone[0]
        spare = max(set(cls.tolist()) & removed, key=lambda c: score_of[c][0])
        selection[score_of[spare][1]].remove(spare)


class _Scorer:
    def __init__(self, gm: fx.GraphModule, a: ChannelAnalysis, ctx, criterion: str | Callable):
        self.gm, self.a, self.ctx, self.criterion = gm, a, ctx, criterion
        self.modules = module_index(gm)
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self._activation_means: dict[str, torch.Tensor] | None = None
        self.fallbacks = 0

    def scores(self, g: ChannelGroup) -> np.ndarray:
        if callable(self.criterion):
            s = np.asarray(list(self.criterion(g, self.a, self.gm)), dtype=np.float64)
            if s.shape != (g.size,):
                raise ValueError(f"criterion returned {s.shape[0] if s.ndim else 0} scores for a group of {g.size}")
            return s
        if self.criterion == "bn_gamma":
            s = self._bn_gamma(g)
            if s is not None:
                return s
            self.fallbacks += 1
            return self._l1(g)
        if self.criterion == "ecdm":
            return self._ecdm(g)
        return self._l1(g)

    # -- L1 --------------------------------------------------------------------------------
    def _l1(self, g: ChannelGroup) -> np.ndarray:
        total = np.zeros(g.size)
        for src, pc in g.position_class.items():
            m = self.modules.get(src)
            if not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                continue
            w = m.weight.detach()
            norms = w.reshape(w.shape[0], -1).abs().sum(1).double().numpy()     # L1 (faster than vector_norm)
            norms = norms / (norms.mean() + 1e-12)
            mine = pc >= 0
            total += np.bincount(pc[mine], weights=norms[mine], minlength=g.size)
        return total

    # -- BN gamma ------------------------------------------------------------------------
    def _bn_gamma(self, g: ChannelGroup) -> np.ndarray | None:
        classes = {c: i for i, c in enumerate(g.classes)}
        total = np.zeros(g.size)
        found = False
        for key, slot in self.a.slots.items():
            if key[0] != "module" or key[2] != "chan":
                continue
            m = self.modules.get(key[1])
            if not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.weight is None:
                continue
            cls = self.a.class_of(slot.ids[0])
            gam = m.weight.detach().abs().double().numpy()
            for pos, c in enumerate(cls.tolist()):
                if c in classes:
                    total[classes[c]] += gam[pos]
                    found = True
        return total if found else None

    # -- group ECDM ------------------------------------------------------------------------
    def _expected_input(self, reader_node: fx.Node) -> torch.Tensor | None:
        """E[x] per input position of a conv/linear reader under the BN-Gaussian model."""
        cur = reader_node.args[0]
        relu = False
        while isinstance(cur, fx.Node):
            if cur.op == "call_module":
                m = self.modules[cur.target]
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                    beta, gamma = m.bias.detach(), m.weight.detach()
                    return relu_gaussian_mean(beta, gamma) if relu else beta.double()
                if isinstance(m, (nn.ReLU, nn.ReLU6)):
                    relu = True
                elif not isinstance(m, (nn.Dropout, nn.Identity, nn.Dropout2d)):
                    return None
            elif cur.op in ("call_function", "call_method") and getattr(cur.target, "__name__", cur.target) in ("relu", "relu_"):
                relu = True
            else:
                return None
            cur = cur.args[0] if cur.args else None
        return None

    def _empirical_means(self) -> dict[str, torch.Tensor]:
        if self._activation_means is None:
            means: dict[str, torch.Tensor] = {}
            readers = {r.node: r for r in self.a.readers if r.kind in ("conv_in", "linear_in")}
            inputs = self.ctx.example_inputs
            if inputs is not None:
                interp = _InputRecorder(self.gm, set(readers))
                with torch.no_grad(), eval_mode(self.gm):
                    interp.run(*inputs)
                for name, x in interp.inputs.items():
                    r = readers[name]
                    dim = 1 if r.kind == "conv_in" else x.dim() - 1
                    means[name] = x.double().transpose(0, dim).reshape(x.shape[dim], -1).mean(1)
            self._activation_means = means
        return self._activation_means

    def _ecdm(self, g: ChannelGroup) -> np.ndarray:
        classes = {c: i for i, c in enumerate(g.classes)}
        score = np.zeros(g.size)
        for r in self.a.readers:
            if r.kind not in ("conv_in", "linear_in") or r.module is None:
                continue
            cls = self.a.class_of(r.ids)
            hit = [(p, classes[c]) for p, c in enumerate(cls.tolist()) if c in classes]
            if not hit:
                continue
            m = self.modules[r.module]
            node = self.nodes[r.node]
            e = self._expected_input(node)
            if e is None or len(e) != len(r.ids):
                e = self._empirical_means().get(r.node)
            if e is None:
                continue
            w = m.weight.detach().double()
            wsum = w.reshape(w.shape[0], w.shape[1], -1).sum(-1)          # out × in
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups > 1:
                continue
            damage = (wsum * e.view(1, -1)).abs()                          # out × in
            normed = damage / damage.sum(1, keepdim=True).clamp_min(1e-12)
            worst = normed.max(0).values.numpy()                           # per input position
            per_class = np.zeros(g.size)
            for p, i in hit:
                per_class[i] += worst[p]
            score = np.maximum(score, per_class)
        if not score.any():
            return self._l1(g)
        return score


class _InputRecorder(fx.Interpreter):
    def __init__(self, gm, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.inputs: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        if n.name in self.names:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.inputs[n.name] = args[0].detach()
        return super().run_node(n)


def _check_latency_options(target_latency, runtime, target_macs, ratios, round_to) -> None:
    from graphsel.analysis.latency import LatencyTable, check_runtime_name

    from .prune_latency import parse_target_latency

    if target_latency is None:
        raise ValueError("runtime= is the runtime of target_latency=; pass target_latency= too (e.g. 0.5 or '12ms')")
    parse_target_latency(target_latency)
    if runtime is not None and not isinstance(runtime, LatencyTable):
        check_runtime_name(runtime)
    clash = [n for n, v in (("target_macs", target_macs), ("ratios", ratios), ("round_to", round_to)) if v]
    if clash:
        raise ValueError(f"target_latency= chooses the widths itself: drop {', '.join(clash)} (latency-aware pruning "
                         f"derives each group's granularity from the latency table)")


def _round_kept(size: int, kept: int, round_to: int | None, min_keep: int) -> int:
    kept = max(min_keep, min(size, kept))
    if round_to and round_to > 1 and size > round_to:
        r = max(round_to, int(round(kept / round_to)) * round_to)
        kept = min(size, r)
    return kept


@register_pass
class Prune(Pass):
    """Record channel removals chosen by a criterion (contract: structural). See module docstring."""

    name = "prune"
    contract = Contract.STRUCTURAL

    def __init__(self, ratio: float | None = 0.5, criterion: str | Callable = "l1", scope: str = "global",
                 round_to: int | None = None, target_macs: float | None = None,
                 ratios: dict[str, float] | None = None, include: Any = None, exclude: Any = None,
                 min_channels: int = 1, target_latency: float | str | None = None, runtime: Any = None):
        if criterion not in CRITERIA and not callable(criterion):
            raise ValueError(f"unknown pruning criterion {criterion!r}; use one of {', '.join(CRITERIA)} "
                             f"or a callable f(group, analysis, gm) -> scores")
        if scope not in ("global", "uniform"):
            raise ValueError(f"scope must be 'global' or 'uniform', got {scope!r}")
        for what, r in [("ratio", ratio)] + [(f"ratios['{k}']", v) for k, v in (ratios or {}).items()]:
            if r is not None and (not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 <= r < 1):
                raise ValueError(f"{what} must be a number in [0, 1) (the fraction of channels to remove), got {r!r}")
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
        if target_macs is not None and (not isinstance(target_macs, (int, float)) or target_macs <= 0):
            raise ValueError(f"target_macs must be a positive MAC count or a fraction in (0, 1), got {target_macs!r}")
        if not isinstance(min_channels, int) or min_channels < 1:
            raise ValueError(f"min_channels must be >= 1, got {min_channels!r}")
        if target_latency is not None or runtime is not None:
            _check_latency_options(target_latency, runtime, target_macs, ratios, round_to)
        super().__init__(ratio=ratio, criterion=criterion, scope=scope, round_to=round_to, target_macs=target_macs,
                         ratios=dict(ratios or {}), include=include, exclude=exclude, min_channels=min_channels,
                         target_latency=target_latency, runtime=runtime)
        self.selection = ModuleSelection(include, exclude, owner="prune")

    # -- selection ------------------------------------------------------------------------
    def _select(self, a: ChannelAnalysis, groups: list[ChannelGroup], scores: dict[int, np.ndarray],
                ratio: float) -> dict[int, list[int]]:
        """Per group index: the class labels to remove (never every channel of a tensor)."""
        return _spare_vanishing_tensors(a, groups, scores, self._rank_and_cut(groups, scores, ratio))

    def _rank_and_cut(self, groups: list[ChannelGroup], scores: dict[int, np.ndarray],
                      ratio: float) -> dict[int, list[int]]:
        """Per group index: the lowest-scoring classes, as many as the ratio and rounding ask."""
        out: dict[int, list[int]] = {}
        own_ratio = {}
        for g in groups:
            for src in g.sources:
                if src in self.ratios:
                    own_ratio[g.index] = self.ratios[src]
        if self.scope == "global":
            pool = []
            for g in groups:
                if g.index in own_ratio:
                    continue
                s = scores[g.index]
                norm_s = s / (s.mean() + 1e-12)
                prunable = set(g.prunable_classes)
                pool.extend((norm_s[i], g.index, c) for i, c in enumerate(g.classes) if c in prunable)
            pool.sort(key=lambda t: t[0])
            n_remove = int(math.floor(ratio * len(pool)))
            chosen: dict[int, list[int]] = {}
            for _, gi, c in pool[:n_remove]:
                chosen.setdefault(gi, []).append(c)
            targets = {g.index: g.size - len(chosen.get(g.index, [])) for g in groups if g.index not in own_ratio}
        else:
            targets = {g.index: g.size - int(math.floor(ratio * len(g.prunable_classes))) for g in groups
                       if g.index not in own_ratio}
        for g in groups:
            if g.index in own_ratio:
                targets[g.index] = g.size - int(math.floor(own_ratio[g.index] * len(g.prunable_classes)))
        for g in groups:
            frozen_count = g.size - len(g.prunable_classes)
            kept = _round_kept(g.size, targets[g.index], self.round_to, max(self.min_channels, frozen_count, 1))
            n_remove = g.size - kept
            if n_remove <= 0:
                continue
            cls = np.asarray(g.classes, dtype=np.int64)
            pick = np.isin(cls, np.asarray(g.prunable_classes, dtype=np.int64))
            cls, s = cls[pick], np.asarray(scores[g.index], dtype=np.float64)[pick]
            order = np.lexsort((cls, s))                      # by score, ties by class label
            out[g.index] = cls[order[:n_remove]].tolist()
        return out

    def _estimate_macs(self, gm, a: ChannelAnalysis, removed: set[int], cost) -> float:
        gone = a.class_lookup(removed)
        frac: dict[str, dict[str, float]] = {}
        for key, slot in a.slots.items():
            if key[0] == "module":
                cls = a.class_of(slot.ids[0])
                frac.setdefault(key[1], {})[key[2]] = float((~gone[cls]).mean()) if len(cls) else 1.0
        total = 0.0
        nodes = {n.name: n for n in gm.graph.nodes}
        for row in cost.rows:
            n = nodes.get(row.node)
            f = 1.0
            if n is not None and n.op == "call_module" and n.target in frac:
                parts = frac[n.target]
                f = parts.get("in", 1.0) * parts.get("out", 1.0) * parts.get("chan", 1.0)
            total += row.macs * f
        return total

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        a: ChannelAnalysis = ctx.analysis("channels", gm)
        diags: list[Diagnostic] = []
        index = module_index(gm)
        self.selection.check_names(index)
        unknown = [p for p in self.ratios if p not in index]
        if unknown:
            raise ValueError(f"prune: {', '.join(map(repr, unknown))} name no module of this model")
        groups = []
        for g in a.groups:
            if not g.prunable:
                if g.frozen_reasons and g.size > 1:
                    diags.append(Diagnostic(f"frozen: {g.frozen_reasons[0]}", ", ".join(g.sources[:2]), "skip"))
                continue
            if self.selection.active:
                touched = [(p, index[p]) for p in g.sources + g.consumers if p in index]
                if any(self.selection.excluded(p, m) for p, m in touched):
                    diags.append(Diagnostic("excluded by request", ", ".join(g.sources[:2]), "skip"))
                    continue
                if self.selection.include is not None and not any(
                        self.selection.selects(p, index[p]) for p in g.sources if p in index):
                    diags.append(Diagnostic("not selected by include", ", ".join(g.sources[:2]), "skip"))
                    continue
            groups.append(g)
        if not groups:
            diags.append(Diagnostic("no prunable channel group", level="info"))
            return PassResult(gm, False, {"channels_removed": 0}, diags)
        scorer = _Scorer(gm, a, ctx, self.criterion)
        scores = {g.index: scorer.scores(g) for g in groups}
        if scorer.fallbacks:
            diags.append(Diagnostic(f"{scorer.fallbacks} group(s) have no BatchNorm; scored by L1 instead", level="info"))
        if self.target_latency is not None:
            from .prune_latency import latency_aware_selection

            selection, lstats, ldiags = latency_aware_selection(
                self, gm, ctx, a, groups, scores, lambda sel: _spare_vanishing_tensors(a, groups, scores, sel))
            diags.extend(ldiags)
            return self._record(gm, a, selection, {"latency": lstats}, diags)
        ratio = self.ratio or 0.0
        est = None
        if self.target_macs is not None:
            cost = ctx.analysis("cost", gm)
            target = self.target_macs * cost.macs if self.target_macs < 1 else self.target_macs
            lo, hi = 0.0, 0.99
            best = None
            for _ in range(18):
                mid = (lo + hi) / 2
                sel = self._select(a, groups, scores, mid)
                m = self._estimate_macs(gm, a, {c for cs in sel.values() for c in cs}, cost)
                if m <= target:
                    best, hi = (mid, m), mid
                else:
                    lo = mid
            if best is None:
                diags.append(Diagnostic(f"target of {target:.3g} MACs is out of reach; pruned at ratio 0.99", level="warning"))
                ratio = 0.99
            else:
                ratio, est = best
        selection = self._select(a, groups, scores, ratio)
        extra = {"est_macs": int(est)} if est is not None else {}
        return self._record(gm, a, selection, {"ratio": round(ratio, 4), **extra}, diags)

    def _record(self, gm: fx.GraphModule, a: ChannelAnalysis, selection: dict[int, list[int]], stats: dict,
                diags: list[Diagnostic]) -> PassResult:
        """Record ``selection`` (group index -> classes) as group masks on ``gm``."""
        removed = {c for cs in selection.values() for c in cs}
        positions_of = removal_positions(a, removed)
        for src, positions in positions_of.items():
            add_group_mask(gm, src, positions)
        channels = sum(len(p) for p in positions_of.values())
        stats = {**stats, "groups_pruned": len(selection), "classes_removed": len(removed),
                 "source_channels_removed": channels}
        return PassResult(gm, modified=False, stats=stats, diagnostics=diags)
