"""Channel masks and their reference semantics (the oracle).

A mask says which channels do not exist. Two kinds, both stored in the graph's metadata
(``gm.meta["graphsel"].masks``) so that passes compose:

* **group masks** — a producer stops making a channel: ``add_group_mask(gm, "layer1.0.conv1", [3, 7])``.
  Removing one output channel of a source removes its whole channel class (every position coupled
  to it: the other operands of a residual add, the slice of a concat, a depthwise conv's channel...).
* **consumer masks** — one consumer stops reading a channel:
  ``add_consumer_mask(gm, "features.denselayer3.conv1", [5])`` (what selective-convolution dealloc
  and discrimination-aware selection produce). Consumers are conv (groups = 1) and linear modules;
  positions are their input channels / input features.

**Reference semantics** (the mask oracle, :mod:`graphsel.pipeline.oracle`): run the graph with
every removed channel forced to zero at every position of its class, consumer-masked inputs
zeroed for that consumer only, and ops that reduce over channels (LayerNorm / GroupNorm /
softmax / mean over channels) computed on the kept channels only. ``FoldMasks`` and
``Materialize`` are verified against it.

A mask that removes every channel of a source is an error (remove the layer instead); so is a
mask on a frozen class (the error names the barrier that froze it).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from graphsel.analysis.channels import ChannelAnalysis, analyze_channels, segment_sums
from graphsel.errors import MaskError
from graphsel.ir.meta import graphsel_meta
from graphsel.ops.channel import TensorVal

_CONSUMER_KINDS = ("conv_in", "linear_in")


@dataclass
class ChannelMasks:
    """Removed channels: ``removed[source] = {output positions}``, ``consumer[module] = {input positions}``."""
    removed: dict[str, set[int]] = field(default_factory=dict)
    consumer: dict[str, set[int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(self.removed.values()) or any(self.consumer.values())

    def count(self) -> tuple[int, int]:
        return sum(map(len, self.removed.values())), sum(map(len, self.consumer.values()))

    def key(self) -> tuple[str, str]:
        """A value equal for equal masks (for caches keyed by masks)."""
        return (repr(sorted((k, sorted(v)) for k, v in self.removed.items())),
                repr(sorted((k, sorted(v)) for k, v in self.consumer.items())))


def get_masks(gm: fx.GraphModule) -> ChannelMasks:
    meta = graphsel_meta(gm)
    if meta.masks is None:
        meta.masks = ChannelMasks()
    return meta.masks


def has_masks(gm: fx.GraphModule) -> bool:
    meta = graphsel_meta(gm, create=False)
    return bool(meta is not None and meta.masks)


def clear_masks(gm: fx.GraphModule) -> None:
    meta = graphsel_meta(gm)
    meta.masks = None


def _positions(removed: Iterable[int], what: str) -> set[int]:
    if isinstance(removed, torch.Tensor):
        removed = removed.flatten().tolist() if removed.dtype != torch.bool else torch.nonzero(removed).flatten().tolist()
    if not isinstance(removed, (set, frozenset, list, tuple)):
        removed = list(removed)
    if all(type(i) is int for i in removed):          # the common case, checked at C speed
        return set(removed)
    out = set()
    for i in removed:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"{what}: channel positions must be integers, got {i!r}")
        out.add(int(i))
    return out


def add_group_mask(gm: fx.GraphModule, source: str, removed: Iterable[int]) -> None:
    """Record that ``source`` (module path of a conv/linear) stops producing output channels ``removed``."""
    get_masks(gm).removed.setdefault(source, set()).update(_positions(removed, f"group mask on '{source}'"))


def add_consumer_mask(gm: fx.GraphModule, consumer: str, removed: Iterable[int]) -> None:
    """Record that ``consumer`` (module path of a conv/linear) stops reading input channels ``removed``."""
    get_masks(gm).consumer.setdefault(consumer, set()).update(_positions(removed, f"consumer mask on '{consumer}'"))


# ------------------------------------------------------------------------------------------


@dataclass
class ResolvedMasks:
    """Masks mapped onto one channel analysis."""
    analysis: ChannelAnalysis
    removed_classes: set[int]
    consumer_keep: dict[str, np.ndarray]       # reader node name -> bool keep per input position
    # the removed classes as a class_lookup table, made on first use
    _removed_table: np.ndarray | None = field(default=None, repr=False, compare=False)

    def keep_of(self, v: TensorVal) -> np.ndarray:
        """Bool keep per position of a tensor value (True where its class survives)."""
        cls = self.analysis.class_of(v.ids)
        if not self.removed_classes:
            return np.ones(len(cls), dtype=bool)
        if self._removed_table is None:
            self._removed_table = self.analysis.class_lookup(
                np.fromiter(self.removed_classes, dtype=np.int64, count=len(self.removed_classes)))
        return ~self._removed_table[cls]


def _closest(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def resolve_masks(gm: fx.GraphModule, masks: ChannelMasks | None = None,
                  analysis: ChannelAnalysis | None = None) -> ResolvedMasks:
    """Map masks (default: ``gm``'s) onto channel classes, checking them (unknown modules,
    out-of-range positions, frozen classes, sources left without channels all raise
    :class:`MaskError`). Inside a pipeline, ``ctx.analysis("resolved_masks", gm, key=masks.key())``
    gives the same, cached."""
    masks = masks if masks is not None else (graphsel_meta(gm).masks or ChannelMasks())
    return _resolve(gm, masks, analysis)


def _resolve(gm: fx.GraphModule, masks: ChannelMasks, analysis: ChannelAnalysis | None) -> ResolvedMasks:
    a = analysis if analysis is not None else analyze_channels(gm)
    by_module: dict[str, list[str]] = {}
    for node_name, path in a.source_module.items():
        by_module.setdefault(path, []).append(node_name)
    removed: set[int] = set()
    frozen = a.class_lookup(np.fromiter(a.class_frozen, dtype=np.int64, count=len(a.class_frozen)))
    for src, positions in masks.removed.items():
        if not positions:
            continue
        nodes = by_module.get(src) or ([src] if src in a.sources else [])
        if not nodes:
            raise MaskError(f"group mask names '{src}', which produces no channels in this graph (not a conv or "
                            f"linear module called by the graph).{_closest(src, by_module)}")
        start, count = a.sources[nodes[0]]
        bad = [p for p in positions if not 0 <= p < count]
        if bad:
            raise MaskError(f"group mask on '{src}' removes channels {sorted(bad)[:5]}, but it has {count} "
                            f"output channels (valid: 0..{count - 1})")
        ordered = np.fromiter(sorted(positions), dtype=np.int64, count=len(positions))
        cls = a.labels[start + ordered]
        hit = np.flatnonzero(frozen[cls])
        if len(hit):
            p, c = int(ordered[hit[0]]), int(cls[hit[0]])
            raise MaskError(f"cannot remove output channel {p} of '{src}': its channel group is frozen "
                            f"({'; '.join(a.class_frozen[c])}). Exclude it from pruning.")
        removed.update(cls.tolist())
    consumer_keep: dict[str, np.ndarray] = {}
    readers_by_module: dict[str, list] = {}
    for r in a.readers:
        if r.kind in _CONSUMER_KINDS and r.module is not None:
            readers_by_module.setdefault(r.module, []).append(r)
    for mod, positions in masks.consumer.items():
        if not positions:
            continue
        readers = readers_by_module.get(mod)
        if not readers:
            raise MaskError(f"consumer mask names '{mod}', which is not a conv (groups=1) or linear module reading "
                            f"channels in this graph.{_closest(mod, readers_by_module)}")
        for r in readers:
            n = len(r.ids)
            bad = [p for p in positions if not 0 <= p < n]
            if bad:
                raise MaskError(f"consumer mask on '{mod}' names inputs {sorted(bad)[:5]}, but it reads {n} "
                                f"(valid: 0..{n - 1})")
            keep = np.ones(n, dtype=bool)
            keep[sorted(positions)] = False
            consumer_keep[r.node] = keep
        mod_obj = gm.get_submodule(mod)
        if isinstance(mod_obj, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod_obj.groups != 1:
            raise MaskError(f"consumer mask on grouped conv '{mod}' (groups={mod_obj.groups}); consumer masks "
                            f"apply to convs with groups=1 and linear layers")
    _check_sources_survive(a, removed)
    return ResolvedMasks(a, removed, consumer_keep)


def vanishing_tensors(a: ChannelAnalysis, removed: set[int]) -> list[tuple[str, np.ndarray]]:
    """Nodes whose every channel position would be removed (name, their classes)."""
    if not removed:
        return []
    gone = a.class_lookup(removed)
    found = [(name, t.ids) for name, _, t in a.channel_tensors() if len(t.ids)]
    if not found:
        return []
    # every tensor's classes in one lookup; a tensor vanishes when none of its positions is kept
    lengths = np.fromiter((len(ids) for _, ids in found), dtype=np.int64, count=len(found))
    starts = np.cumsum(lengths) - lengths
    cls = a.class_of(np.concatenate([ids for _, ids in found]))
    kept = segment_sums(~gone[cls], lengths)                 # label -1 (no channel) counts as kept
    return [(found[i][0], cls[starts[i]:starts[i] + lengths[i]]) for i in np.flatnonzero(kept == 0)]


def _check_sources_survive(a: ChannelAnalysis, removed: set[int]) -> None:
    if not removed:
        return
    gone = a.class_lookup(removed)
    for node_name, (start, count) in a.sources.items():
        if count and gone[a.labels[start:start + count]].all():
            raise MaskError(f"the masks remove all {count} output channels of '{a.source_name(node_name)}'; keep "
                            f"at least one channel (graphsel does not delete whole layers by masking)")
    gone = vanishing_tensors(a, removed)
    if gone:
        name, cls = gone[0]
        raise MaskError(f"the masks remove every channel of node '{name}' ({len(cls)} channels, e.g. one piece of a "
                        f"split); keep at least one of them")


def dead_classes(resolved: ResolvedMasks) -> set[int]:
    """Liveness: classes that some consumer stopped reading and that no reader reads any more.

    A reader reads every class at its input positions, except a consumer-masked reader, which
    reads only its unmasked positions. Frozen classes are never dead. Classes no reader ever read
    and no mask mentioned are left alone (removing them would change nothing)."""
    a = resolved.analysis
    alive: set[int] = set()
    masked: set[int] = set()
    for r in a.readers:
        cls = a.class_of(r.ids)
        keep = resolved.consumer_keep.get(r.node)
        if keep is None:
            alive.update(cls[cls >= 0].tolist())
        else:
            alive.update(cls[(cls >= 0) & keep].tolist())
            masked.update(cls[(cls >= 0) & ~keep].tolist())
    return {c for c in masked - alive - resolved.removed_classes if c not in a.class_frozen}


def removal_positions(a: ChannelAnalysis, classes: set[int]) -> dict[str, set[int]]:
    """Group masks (source -> output positions) equivalent to removing ``classes``."""
    if not classes:
        return {}
    gone = a.class_lookup(classes)
    out: dict[str, set[int]] = {}
    for node_name, (start, count) in a.sources.items():
        hit = np.flatnonzero(gone[a.labels[start:start + count]])
        if len(hit):
            out.setdefault(a.source_name(node_name), set()).update(hit.tolist())
    return out
