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

import numpy as np
import torch.fx as fx

from graphsel import Contract, Diagnostic, Pass, PassResult, register_pass
from graphsel.pipeline.context import graph_fingerprint
from graphsel.analysis.masks import ChannelMasks, dead_classes, removal_positions, resolve_masks, vanishing_tensors
from graphsel.ir.meta import graphsel_meta

#: ``gm.meta`` key: (graph fingerprint, masks key, stats) of the masks FoldMasks left, so that
#: Materialize does not fold the same masks of the same graph again
FOLDED_KEY = "graphsel_folded_masks"


def fold(gm: fx.GraphModule, analysis, *, fingerprint: int | None = None) -> tuple[ChannelMasks, dict]:
    """Canonical masks after liveness, and statistics (``fingerprint``: ``gm``'s, when known)."""
    masks = graphsel_meta(gm).masks
    res = resolve_masks(gm, masks, analysis, fingerprint=fingerprint)
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


@register_pass
class FoldMasks(Pass):
    """Liveness analysis of channel masks (contract: exact w.r.t. the masked model). See module docstring."""

    name = "fold_masks"
    contract = Contract.EXACT

    def __init__(self):
        super().__init__()

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        meta = graphsel_meta(gm)
        if not meta.masks:
            return PassResult(gm, False, {}, [Diagnostic("no channel masks to fold", level="info")])
        fingerprint = graph_fingerprint(gm)          # the graph does not change in this pass
        canonical, stats = fold(gm, ctx.analysis("channels", gm, fingerprint=fingerprint), fingerprint=fingerprint)
        diags = []
        if stats["last_channels_kept"]:
            diags.append(Diagnostic(f"{stats['last_channels_kept']} unread channel class(es) kept: removing them "
                                    f"would leave a layer without output channels", level="warning"))
        meta.masks = canonical
        gm.meta[FOLDED_KEY] = (fingerprint, canonical.key(), stats)
        return PassResult(gm, modified=False, stats=stats, diagnostics=diags)



def fold_once(gm: fx.GraphModule, analysis, *, fingerprint: int | None = None) -> tuple[ChannelMasks, dict]:
    """:func:`fold`, or the result FoldMasks recorded when the graph and its masks are unchanged
    since (folding canonical masks again gives them back)."""
    masks = graphsel_meta(gm).masks
    done = gm.meta.get(FOLDED_KEY)
    fingerprint = graph_fingerprint(gm) if fingerprint is None else fingerprint
    if done is not None and masks is not None and done[0] == fingerprint and done[1] == masks.key():
        return masks, dict(done[2])
    return fold(gm, analysis, fingerprint=fingerprint)
