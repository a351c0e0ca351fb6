"""DiscriminationAwarePruning (``dcp``): phase 2 of DCP — greedy, discrimination-aware selection of
input channels, layer by layer inside each segment, recorded as consumer masks.

Contract: **structural** (the pruned layers' weights change by design). The pass never modifies
the user's model; it replaces the weights of the layers it prunes with new tensors whose
unselected input columns are **exactly zero**, and records a consumer mask for them
(:func:`graphsel.analysis.masks.add_consumer_mask`). ``fold_masks`` then removes the channels
nobody reads any more and ``materialize`` slices them out — with the BatchNorm between and the
producer's filters — verified against the mask oracle::

    slim = graphsel.transform(model, [("dcp", {"ratio": 0.5, "data": batches}), "fold_masks", "materialize"], x)

Steps (paper 003, Algorithm 1 without the per-stage fine-tuning, which :func:`.finetune` does):

1. residual blocks and pivots are found on the graph (:mod:`.pivots`); without auxiliary
   classifiers already in the graph (``dcp_heads`` + :func:`.finetune`), ``heads`` of them are
   inserted and, unless ``fit_heads=False``, fitted to the frozen features (:func:`.fit_heads`:
   exact BatchNorm statistics, L-BFGS on the Linear layer) — a classifier with random weights
   would make L_S meaningless;
2. every candidate layer (``scope``; :func:`.candidate_layers`) belongs to the segment of the first
   pivot after it (the last segment uses the model's output); segments are processed in order,
   layers in graph order, each by :func:`.greedy_select` against the original network's output of
   that layer, the network pruned so far providing its input;
3. the target per layer is c − ⌊c·η⌋ kept input channels (``ratio`` = η; at least one);
   ``adapt=ε`` adds DCP-Adapt's stopping rule |ΔL|/L₀ ≤ ε (with ``ratio=0`` it alone decides);
4. the heads are removed again (``keep_heads=True`` keeps them).

Options: ``ratio``, ``data`` (a re-iterable of ``(inputs, targets)`` batches — a DataLoader or a
list), ``scope`` (``"block_internal"``: input channels of convs/linears inside residual blocks that
do not read the residual stream; ``"all"``: every conv (groups = 1) and linear input), ``heads``,
``lam`` (λ), ``mse_weight`` (the weight of L_M: ``lam=0`` gives L_M only, ``mse_weight=0`` L_S
only), ``mse_reduction`` (``"paper"``: ½‖O − O*‖² summed over output channels, averaged over
samples and positions; ``"mean"``: the authors' code's mean over every element), ``adapt``,
``score`` (``"paper"`` or ``"authors"``), ``steps`` (masked-SGD steps after each selection;
default one pass over the data), ``lr``, ``momentum``, ``fit_heads`` (``"auto"``: only
heads this pass inserts), ``head_iters``, ``keep_heads``, ``cache_mb`` (prefix cache budget),
``include`` / ``exclude`` (module selection of the pruned layers), ``progress``.

Under torch.distributed (torchrun) run the pass on every rank, each with its own ``data``: the
heads' statistics and the selection's sums are reduced over the default process group
(:func:`.fit_heads`, :mod:`.select`), so every rank records the same masks and weights, those of
one process on the ranks' batches concatenated. To run it on one rank alone, wrap the call in
``with graphsel.distributed.local():``.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from graphsel.analysis.masks import add_consumer_mask
from graphsel.ir.copying import deepcopy_module
from graphsel.ir.graph import module_index
from graphsel.pipeline.passbase import Contract, Diagnostic, Pass, PassResult
from graphsel.pipeline.registry import register_pass
from graphsel.pipeline.select import ModuleSelection
from graphsel.pipeline.verify import eval_mode

from .data import as_source
from .errors import DCPError
from .finetune import fit_heads
from .heads import HEAD_ROOT, dcp_state, heads_of, insert_heads, num_classes_of, own_heads, remove_heads
from .pivots import SCOPES, ancestors, candidate_layers, check_heads, find_structure
from .select import MSE_REDUCTIONS, SCORES, LayerProblem, greedy_select


def _number(v, name: str, lo: float = 0.0, hi: float | None = None, open_hi: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or \
            (hi is not None and (v >= hi if open_hi else v > hi)):
        rng = f"[{lo}, {hi})" if open_hi else (f"[{lo}, {hi}]" if hi is not None else f"≥ {lo}")
        raise DCPError(f"dcp: {name} must be a number in {rng}, got {v!r}")


def keep_count(channels: int, ratio: float) -> int:
    """Input channels DCP keeps of ``channels`` at pruning rate η: c − ⌊c·η⌋ (at least one)."""
    return max(1, channels - int(math.floor(channels * ratio)))


@register_pass
class DiscriminationAwarePruning(Pass):
    """Discrimination-aware channel selection (contract: structural). See the module docstring."""

    name = "dcp"
    contract = Contract.STRUCTURAL

    def __init__(self, ratio: float = 0.5, data: Any = None, scope: str = "block_internal",
                 heads: int | str = "auto", lam: float = 1.0, mse_weight: float = 1.0, mse_reduction: str = "paper",
                 adapt: float | None = None,
                 score: str = "paper", steps: int | None = None, lr: float = 0.01, momentum: float = 0.9,
                 fit_heads: bool | str = "auto", head_iters: int = 50, keep_heads: bool = False,
                 cache_mb: float = 1024, include: Any = None, exclude: Any = None, progress: bool | None = None):
        _number(ratio, "ratio (η, the fraction of input channels to remove)", 0.0, 1.0, open_hi=True)
        if scope not in SCOPES:
            raise DCPError(f"dcp: scope must be one of {SCOPES}, got {scope!r}")
        check_heads(heads, "dcp")
        _number(lam, "lam (λ, the weight of the auxiliary cross-entropy)")
        _number(mse_weight, "mse_weight")
        if not lam and not mse_weight:
            raise DCPError("dcp: lam and mse_weight are both 0, so there is no loss to select channels by")
        if mse_reduction not in MSE_REDUCTIONS:
            raise DCPError(f"dcp: mse_reduction must be one of {MSE_REDUCTIONS}, got {mse_reduction!r}")
        if adapt is not None:
            _number(adapt, "adapt (ε of DCP-Adapt, or None)")
        if score not in SCORES:
            raise DCPError(f"dcp: score must be one of {SCORES}, got {score!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise DCPError(f"dcp: steps must be None (one pass over the data) or an int ≥ 0, got {steps!r}")
        _number(lr, "lr")
        _number(momentum, "momentum", 0.0, 1.0, open_hi=True)
        if fit_heads not in ("auto", True, False):
            raise DCPError(f"dcp: fit_heads must be 'auto', True or False, got {fit_heads!r}")
        if isinstance(head_iters, bool) or not isinstance(head_iters, int) or head_iters < 0:
            raise DCPError(f"dcp: head_iters must be an int ≥ 0, got {head_iters!r}")
        _number(cache_mb, "cache_mb")
        source = as_source(data, "dcp")
        super().__init__(ratio=ratio, data=source, scope=scope, heads=heads, lam=lam, mse_weight=mse_weight,
                         mse_reduction=mse_reduction, adapt=adapt, score=score, steps=steps, lr=lr,
                         momentum=momentum, fit_heads=fit_heads, head_iters=head_iters, keep_heads=keep_heads,
                         cache_mb=cache_mb, include=include, exclude=exclude, progress=progress)
        self.selection = ModuleSelection(include, exclude, owner="dcp")

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        t0 = time.perf_counter()
        a = ctx.analysis("channels", gm)
        structure = find_structure(gm, a)
        if self.scope == "block_internal" and not structure.blocks:
            raise DCPError(f"dcp: scope='block_internal' finds nothing to prune: {structure.no_blocks_reason()}. "
                           f"Use scope='all' to select the input channels of every convolution, or prune with "
                           f"('prune', {{...}}).")
        num_classes = num_classes_of(gm, "dcp")
        self.selection.check_names(module_index(gm))
        head_paths = {p for p in module_index(gm) if p == HEAD_ROOT or p.startswith(HEAD_ROOT + ".")}
        layers, diags = candidate_layers(gm, a, structure, self.scope, self.selection, head_paths)
        if not layers:
            diags.append(Diagnostic(f"no layer to prune under scope={self.scope!r} (see the skipped ones)",
                                    level="info"))
            return PassResult(gm, False, {"layers": 0, "channels_removed": 0, "blocks": len(structure.blocks)}, diags)
        inserted = False
        if not heads_of(gm):
            pivots = structure.pivots(self.heads)
            if pivots:
                _, more = insert_heads(gm, a, structure, pivots, num_classes)
                diags.extend(more)
                inserted = bool(heads_of(gm))
        elif self.heads != "auto" and len(heads_of(gm)) != structure.heads_for(self.heads):
            diags.append(Diagnostic(f"the graph has {len(heads_of(gm))} auxiliary classifier(s) already; they are "
                                    f"used (heads={self.heads!r} ignored)", level="info"))
        heads = heads_of(gm)
        fitted = {}
        if heads and (self.fit_heads is True or (self.fit_heads == "auto" and inserted)):
            own_heads(gm)
            fitted = fit_heads(gm, self.data, iters=self.head_iters)
        # the original network: the same graph and tensors, its own module objects
        memo = {id(t): t for t in list(gm.parameters()) + list(gm.buffers())}
        reference = deepcopy_module(gm, memo)
        segment_of = self._segments(gm, layers, heads)
        output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        index = module_index(gm)
        records: dict[str, dict[str, Any]] = {}
        removed_total = 0
        order = sorted(range(len(layers)), key=lambda i: (segment_of[i], i))
        with eval_mode(gm), eval_mode(reference):
            for i in order:
                layer = layers[i]
                seg = segment_of[i]
                target = heads[seg]["logits"] if seg < len(heads) else output.name
                module = index[layer.module]
                goal = keep_count(layer.channels, self.ratio) if self.adapt is None or self.ratio > 0 \
                    else layer.channels
                if goal >= layer.channels and self.adapt is None:       # nothing to remove: left as it is
                    records[layer.module] = {"channels": layer.channels, "kept": list(range(layer.channels)),
                                             "order": [], "target": goal, "stopped": "target", "segment": seg,
                                             "block": layer.block, "producers": list(layer.producers),
                                             "losses": [], "seconds": 0.0}
                    continue
                original = module.weight.detach().clone()
                module.weight = nn.Parameter(torch.zeros_like(original))
                problem = LayerProblem(gm, reference, layer.node, target, self.data, lam=self.lam,
                                       mse_weight=self.mse_weight, mse_reduction=self.mse_reduction,
                                       cache_bytes=self.cache_mb * 2 ** 20)
                sel = greedy_select(problem, original, goal, score=self.score, adapt=self.adapt, steps=self.steps,
                                    lr=self.lr, momentum=self.momentum, progress=self.progress,
                                    desc=f"dcp {layer.module}")
                module.weight = nn.Parameter(sel.weight, requires_grad=original.requires_grad)
                if sel.removed:
                    add_consumer_mask(gm, layer.module, sel.removed)
                removed_total += len(sel.removed)
                records[layer.module] = {"channels": layer.channels, "kept": sorted(sel.kept), "order": sel.kept,
                                         "target": sel.target, "stopped": sel.stopped, "segment": seg,
                                         "block": layer.block, "producers": list(layer.producers),
                                         "losses": sel.losses, "seconds": sel.seconds}
        n_heads = len(heads)
        if not self.keep_heads:
            remove_heads(gm)
        state = dcp_state(gm)
        state["layers"] = records
        state["ratio"], state["scope"] = self.ratio, self.scope
        if fitted:
            state["head_fit"] = fitted
        stats = {"layers": len(records), "channels_removed": removed_total,
                 "channels": sum(r["channels"] for r in records.values()), "blocks": len(structure.blocks),
                 "stages": structure.stages, "heads": n_heads, "heads_inserted": inserted,
                 "adapt_stops": sum(r["stopped"] == "adapt" for r in records.values()),
                 "selection_seconds": round(sum(r["seconds"] for r in records.values()), 3),
                 "seconds": round(time.perf_counter() - t0, 3)}
        return PassResult(gm, True, stats, diags)

    @staticmethod
    def _segments(gm: fx.GraphModule, layers, heads) -> list[int]:
        """Per layer, the index of the first head whose pivot depends on it (len(heads): the last
        segment, judged by the model's output)."""
        nodes = {n.name: n for n in gm.graph.nodes}
        above = [ancestors(nodes[h["pivot"]]) for h in heads]
        out = []
        for layer in layers:
            n = nodes[layer.node]
            out.append(next((i for i, anc in enumerate(above) if n in anc), len(heads)))
        return out
