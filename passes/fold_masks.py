"""FoldMasks (``fold_masks``): liveness analysis of channel masks.

Contract: exact with respect to the masked model (the mask oracle gives the same outputs before
and after: only channels nobody reads are added to the removed set).

A channel class leaves the graph when no reader reads it any more: every consumer that read it
has a consumer mask excluding it (e.g. all the convolutions that selective-convolution dealloc or
DCP selection closed it for). The pass rewrites the masks in canonical form — group masks naming
every source position of every removed class, consumer masks only for channels that other readers
still need — and reports what liveness removed. Channels some consumers still read stay; each
non-reading consumer gets, from :class:`~graphsel.passes.Materialize`, a gather on the path
exclusive to it (in a DenseNet unit: before the unit's own BatchNorm) or, where no exclusive path
exists, zeroed weight columns.

Errors: masks naming unknown modules, out-of-range positions, frozen channels, or removing every
channel of a source (:class:`graphsel.MaskError`).
"""
from __future__ import annotations

import torch.fx as fx

from graphsel.analysis.masks import ChannelMasks, dead_classes, removal_positions, vanishing_tensors
from graphsel.ir.meta import graphsel_meta
from graphsel.pipeline.passbase import Contract, Diagnostic, Pass, PassResult
from graphsel.pipeline.registry import register_pass


def fold(gm: fx.GraphModule, ctx) -> tuple[ChannelMasks, dict]:
    """Canonical masks after liveness, and statistics."""
    masks = graphsel_meta(gm).masks
    res = ctx.analysis("resolved_masks", gm, key=masks.key())
    dead = dead_classes(res)
    # never let liveness remove the last channels of a source or of any tensor
    a = res.analysis
    kept_dead = set(dead)
    while kept_dead:
        gone = vanishing_tensors(a, res.removed_classes | kept_dead)
        if not gone:
            break
        for _, cls in gone:
            kept_dead -= set(cls.tolist())
    removed = res.removed_classes | kept_dead
    canonical = ChannelMasks(removed=removal_positions(a, removed))
    remaining = 0
    for mod, positions in masks.consumer.items():
        keep_positions = set()
        for r in (r for r in a.readers if r.module == mod and r.node in res.consumer_keep):
            cls = a.class_of(r.ids)
            for p in positions:
                if 0 <= p < len(cls) and cls[p] not in removed:
                    keep_positions.add(p)
        if keep_positions:
            canonical.consumer[mod] = keep_positions
            remaining += len(keep_positions)
    stats = {"classes_removed_by_liveness": len(kept_dead), "classes_removed": len(removed),
             "consumer_positions_remaining": remaining,
             "last_channels_kept": len(dead) - len(kept_dead)}
    return canonical, stats


def folded(gm: fx.GraphModule, ctx) -> tuple[ChannelMasks, dict]:
    """:func:`fold` of ``gm``'s masks, cached: folding the canonical masks again gives them back,
    so the fold FoldMasks recorded serves Materialize while graph and masks are unchanged."""
    key = graphsel_meta(gm).masks.key()
    cached = ctx.cached("folded_masks", gm, key)
    if cached is None:
        cached = fold(gm, ctx)
        ctx.store("folded_masks", gm, cached, key=key)
    return cached


@register_pass
class FoldMasks(Pass):
    """Liveness analysis of channel masks (contract: exact w.r.t. the masked model). See module docstring."""

    name = "fold_masks"
    contract = Contract.EXACT

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        meta = graphsel_meta(gm)
        if not meta.masks:
            return PassResult(gm, False, {}, [Diagnostic("no channel masks to fold", level="info")])
        canonical, stats = fold(gm, ctx)
        diags = []
        if stats["last_channels_kept"]:
            diags.append(Diagnostic(f"{stats['last_channels_kept']} unread channel class(es) kept: removing them "
                                    f"would leave a layer without output channels", level="warning"))
        meta.masks = canonical
        ctx.store("folded_masks", gm, (canonical, stats), key=canonical.key())
        return PassResult(gm, modified=False, stats=stats, diagnostics=diags)
