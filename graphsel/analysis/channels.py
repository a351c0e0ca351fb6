"""Channel analysis: which channel positions of a graph must be kept or removed together.

Abstract interpretation over a traced graph with shapes. Every channel produced by a *source*
(a convolution or linear output, a model input) gets an integer **id**. Each tensor value is
abstracted as :class:`TensorVal`: its shape, the dimension that carries channel ids (``dim``)
and the id at each position along it (``-1``: a position that belongs to no channel and is never
removed). Ops move ids:

* per-channel ops (activations, BatchNorm, dropout, pooling, interpolation, spatial padding,
  depthwise convolution) carry ids through;
* element-wise ops (add, mul, ...) **union** the ids their operands have at the same position,
  with broadcasting: an operand of size 1 along the channel dimension is *read*, not coupled
  (an N×1×H×W attention map does not couple the channels it scales);
* shape ops (cat, split, chunk, getitem, view, reshape, flatten, permute, transpose, expand,
  index_select, channel shuffle) run on a tensor of ids, and the result is read back: the channel
  dimension of the result is found, ids in each slice along it are unioned so that any removal is
  rectangular, and view-like ops are checked to commute with channel removal — this derives
  channel shuffles, flatten→Linear feature blocks and NHWC permutes without special cases;
* convolution and linear layers *read* their input channels and *create* new ids; grouped
  convolutions couple the same position of every group (uniform pruning per group);
* LayerNorm over channels, GroupNorm and softmax over channels *reduce over channels*: the
  reference oracle computes them on the kept channels only;
* anything not understood — leaves (incl. attention), unknown functions, tensors graphsel cannot
  slice — is a **barrier**: every id reaching it is frozen, with the reason recorded. Unknown
  never means pass-through.

Ids that meet are unioned into **channel classes** (connected components); a class is removed
as a whole. Classes with the same set of producing sources form a :class:`ChannelGroup`.
Parameters and modules that have one entry per channel are **slots**: the ids at each of their
positions (all call sites unioned), so slicing them is consistent by construction.
"""
from __future__ import annotations

import math
import operator
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from graphsel.ir.graph import module_index
from graphsel.ir.shapes import tensor_shape

# ------------------------------------------------------------------------------------------
# abstract values


@dataclass
class TensorVal:
    """A tensor: ``ids[i]`` is the channel id at position i of dimension ``dim`` (None: no channels)."""
    shape: tuple[int, ...]
    dim: int | None = None
    ids: np.ndarray | None = None

    @property
    def has_channels(self) -> bool:
        return self.dim is not None

    def full(self) -> torch.Tensor:
        """A tensor of this shape holding the id of every element (-1 where none)."""
        if self.dim is None:
            return torch.full(self.shape, -1, dtype=torch.int64)
        view = [1] * len(self.shape)
        view[self.dim] = len(self.ids)
        return torch.from_numpy(self.ids).view(view).expand(self.shape).contiguous()


@dataclass
class ParamVal:
    """A parameter or buffer read with get_attr (sliceable by target)."""
    target: str
    shape: tuple[int, ...]


@dataclass
class Unknown:
    """A value graphsel does not understand (barrier output)."""
    reason: str


class SizeInt(int):
    """An int read from a channel dimension's size (or computed from one): ``ids`` are the channel
    ids whose count it reflects. Using it to shape a tensor that does not hold those channels, or
    anywhere graphsel cannot follow, freezes them (the size would change under pruning)."""
    ids: np.ndarray

    created = 0     # instances made so far (process-wide): no new ones, no channel counts to follow

    def __new__(cls, value: int, ids: np.ndarray):
        obj = super().__new__(cls, value)
        obj.ids = ids
        SizeInt.created += 1
        return obj


def _size_ids(v: Any) -> list[np.ndarray]:
    if isinstance(v, SizeInt):
        return [v.ids]
    if isinstance(v, (list, tuple)):
        return [i for x in v for i in _size_ids(x)]
    if isinstance(v, dict):
        return [i for x in v.values() for i in _size_ids(x)]
    if isinstance(v, slice):
        return _size_ids([v.start, v.stop, v.step])
    return []


def _shape_of(t: "TensorVal") -> tuple:
    """``t.shape`` with the channel dimension's size as a :class:`SizeInt`."""
    return tuple(SizeInt(s, t.ids) if t.has_channels and d == t.dim else s for d, s in enumerate(t.shape))


def _plain(shape) -> TensorVal:
    return TensorVal(tuple(shape), None, None)


# ------------------------------------------------------------------------------------------
# results


@dataclass
class Reader:
    """A node that reads channel ids: a conv/linear input, a channel reduction, a broadcast operand."""
    node: str
    kind: str                # "conv_in", "linear_in", "reduce", "broadcast", "select"
    ids: np.ndarray          # id at each input position along the read dimension
    module: str | None = None
    keeps_channels: bool = False   # a "reduce" reader whose output keeps the channel dim (norms, softmax)


@dataclass
class Slot:
    """Something with one entry per channel position (a module's in/out channels, a parameter dim)."""
    key: tuple
    length: int
    ids: list[np.ndarray] = field(default_factory=list)   # one per use; unioned position-wise
    nodes: list[str] = field(default_factory=list)


@dataclass
class ChannelGroup:
    """Channel classes produced by the same set of sources (e.g. a residual stream, a conv's outputs)."""
    index: int
    sources: list[str]                       # source module paths / node names
    classes: list[int]                       # class labels, ordered by the first source's channel order
    position_class: dict[str, np.ndarray]    # source -> per output position, its class's index in
                                             # ``classes`` (-1: a position of another group)
    consumers: list[str]                     # reader nodes (module paths where available)
    frozen_reasons: list[str]
    prunable_classes: list[int]

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def positions(self) -> dict[str, list[list[int]]]:
        """source -> for each class (in ``classes`` order), its output positions."""
        out = {}
        for src, pc in self.position_class.items():
            lst: list[list[int]] = [[] for _ in self.classes]
            for pos, i in enumerate(pc.tolist()):
                if i >= 0:
                    lst[i].append(pos)
            out[src] = lst
        return out

    @property
    def prunable(self) -> bool:
        return len(self.prunable_classes) > 1

    def __repr__(self) -> str:
        status = "prunable" if self.prunable else f"frozen ({'; '.join(self.frozen_reasons[:2])})"
        return f"ChannelGroup#{self.index}(size={self.size}, sources={self.sources[:3]}{'...' if len(self.sources) > 3 else ''}, {status})"


class ChannelAnalysis:
    """The result of :func:`analyze_channels` (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule):
        # no reference to gm: analyses are cached next to (and weakly keyed by) their graph
        self.node_order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        self.values: dict[str, Any] = {}
        self.readers: list[Reader] = []
        self.slots: dict[tuple, Slot] = {}
        self.barriers: list[tuple[str, str]] = []
        self.sources: dict[str, tuple[int, int]] = {}          # node name -> (first id, count)
        self.source_module: dict[str, str] = {}                # node name -> module path
        self._id_owner: list[str] = []                         # per id block: node name
        self._id_start: list[int] = []
        self._n_ids = 0
        self._edges: list[np.ndarray] = []
        self._frozen: dict[int, str] = {}
        self._layout_checks: list[tuple[fx.Node, TensorVal, TensorVal]] = []
        self._size_uses: list[tuple[fx.Node, np.ndarray, np.ndarray | None]] = []
        self.labels: np.ndarray = np.zeros(0, dtype=np.int64)
        self.n_classes = 0
        self.class_frozen: dict[int, list[str]] = {}
        self.groups: list[ChannelGroup] = []
        self.seconds = 0.0

    # -- id bookkeeping -------------------------------------------------------------------
    def new_ids(self, node: fx.Node, count: int, module: str | None = None) -> np.ndarray:
        start = self._n_ids
        self._n_ids += count
        self.sources[node.name] = (start, count)
        if module is not None:
            self.source_module[node.name] = module
        self._id_owner.append(node.name)
        self._id_start.append(start)
        return np.arange(start, start + count, dtype=np.int64)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64).ravel()
        ok = (a >= 0) & (b >= 0) & (a != b)
        if ok.any():
            self._edges.append(np.stack([a[ok], b[ok]]))

    def freeze(self, ids: Iterable[int] | np.ndarray, reason: str) -> None:
        for i in np.unique(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)):
            if i >= 0 and i not in self._frozen:
                self._frozen[int(i)] = reason

    def freeze_value(self, v: Any, reason: str) -> None:
        for t in _tensor_vals(v):
            if t.has_channels:
                self.freeze(t.ids, reason)

    def barrier(self, node: fx.Node, reason: str, args: Any) -> Unknown:
        self.barriers.append((node.name, reason))
        self.freeze_value(args, f"{reason} (node {node.name})")
        return Unknown(reason if "(node " in reason else f"{reason} (node {node.name})")

    def add_slot(self, key: tuple, ids: np.ndarray, node: fx.Node) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        s = self.slots.get(key)
        if s is None:
            s = self.slots[key] = Slot(key, len(ids))
        if len(ids) != s.length:
            self.freeze(ids, f"{key[1]} is used with {len(ids)} and {s.length} channels")
            for other in s.ids:
                self.freeze(other, f"{key[1]} is used with different channel counts")
            return
        for other in s.ids:
            self.union(other, ids)
        s.ids.append(ids)
        s.nodes.append(node.name)

    # -- results --------------------------------------------------------------------------
    def finalize(self) -> None:
        n = self._n_ids
        if self._edges:
            e = np.concatenate(self._edges, axis=1)
            mat = coo_matrix((np.ones(e.shape[1], dtype=np.int8), (e[0], e[1])), shape=(n, n))
            self.n_classes, self.labels = connected_components(mat, directed=False)
        else:
            self.n_classes, self.labels = n, np.arange(n, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        for node, x, out in self._layout_checks:
            self._check_commutes(node, x, out)
        for node, size_ids, target_ids in self._size_uses:
            cs = set(self.class_of(size_ids).tolist()) - {-1}
            ct = set(self.class_of(target_ids).tolist()) if target_ids is not None else set()
            if not cs <= ct:
                self.freeze(size_ids, f"a channel count is used to shape other data at {_fn_name(node)} (node {node.name})")
        # drop the fx.Node references: an analysis must not keep its graph alive (it is cached
        # in weak-keyed caches whose values must not reach their keys)
        self._layout_checks, self._size_uses = [], []
        cf: dict[int, list[str]] = defaultdict(list)
        for i, r in self._frozen.items():
            lst = cf[int(self.labels[i])]
            if r not in lst and len(lst) < 4:
                lst.append(r)
        self.class_frozen = dict(cf)
        self._build_groups()

    def _check_commutes(self, node: fx.Node, x: TensorVal, out: TensorVal) -> None:
        """A view-like op must give the same result whether classes are removed before or after it
        (tested on removing one class and every other class); otherwise its classes are frozen."""
        cin, cout = self.class_of(x.ids), self.class_of(out.ids)
        live = np.unique(cout[cout >= 0])
        if len(live) < 2:
            return
        for removed in (live[:1], live[::2]):
            keep_in = np.flatnonzero(~np.isin(cin, removed))
            keep_out = np.flatnonzero(~np.isin(cout, removed))
            xin = x.full().index_select(x.dim, torch.from_numpy(keep_in))
            want = out.full().index_select(out.dim, torch.from_numpy(keep_out))
            if xin.numel() != want.numel() or not np.array_equal(
                    self.class_of(xin.reshape(want.shape).numpy()), self.class_of(want.numpy())):
                self.freeze(np.concatenate([x.ids, out.ids]),
                            f"{_fn_name(node)} reshapes channels in a way that does not survive removal (node {node.name})")
                return

    def channel_tensors(self) -> Iterator[tuple[str, int | None, TensorVal]]:
        """(node name, position in its tuple result or None, value) for every tensor value with
        channels."""
        for name, v in self.values.items():
            if isinstance(v, tuple):
                for k, t in enumerate(v):
                    if isinstance(t, TensorVal) and t.has_channels:
                        yield name, k, t
            elif isinstance(v, TensorVal) and v.has_channels:
                yield name, None, v

    def class_lookup(self, classes: Iterable[int] | np.ndarray) -> np.ndarray:
        """A bool table over class labels with one extra False entry at the end, so that
        ``table[class_of(ids)]`` tells which positions belong to ``classes`` (label -1 → False):
        the vectorised ``np.isin`` for repeated membership tests against one set."""
        table = np.zeros(self.n_classes + 1, dtype=bool)
        arr = classes if isinstance(classes, np.ndarray) else np.fromiter(classes, dtype=np.int64)
        if len(arr):
            table[arr] = True
        table[-1] = False
        return table

    def class_of(self, ids: np.ndarray) -> np.ndarray:
        """Class label per id (-1 stays -1)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full(ids.shape, -1, dtype=np.int64)
        ok = ids >= 0
        out[ok] = self.labels[ids[ok]]
        return out

    def owner_of_id(self, i: int) -> tuple[str, int]:
        k = int(np.searchsorted(self._id_start, i, side="right") - 1)
        name = self._id_owner[k]
        return name, i - self.sources[name][0]

    def source_name(self, node_name: str) -> str:
        return self.source_module.get(node_name, node_name)

    def _build_groups(self) -> None:
        """Classes with the same set of producing id blocks form a group (vectorised: the models
        of interest have 10⁴–10⁵ channel ids)."""
        n = self._n_ids
        if n == 0:
            return
        n_src = len(self._id_start)
        counts = np.array([self.sources[o][1] for o in self._id_owner], dtype=np.int64)
        owner_index = np.repeat(np.arange(n_src, dtype=np.int64), counts)   # id blocks are consecutive
        labels = self.labels
        # (class, block) pairs, sorted by class then block: each class's key is its run of blocks
        pairs = _unique_ints(labels * n_src + owner_index)
        pair_cls, pair_own = pairs // n_src, pairs % n_src
        classes_present, seg_start, seg_len = np.unique(pair_cls, return_index=True, return_counts=True)
        key_id = _segment_keys(pair_own, seg_start, seg_len)                 # per present class
        cls_group = np.full(self.n_classes, -1, dtype=np.int64)
        cls_group[classes_present] = key_id
        # classes in the order of their first id (= first position in their first block)
        first_id = np.full(self.n_classes, n, dtype=np.int64)
        np.minimum.at(first_id, labels, np.arange(n, dtype=np.int64))       # = np.unique's return_index, ~40× faster
        order = np.argsort(first_id, kind="stable")                         # labels are 0..n_classes-1
        by_group = order[np.argsort(cls_group[order], kind="stable")]
        n_groups = int(key_id.max()) + 1
        bounds = np.searchsorted(cls_group[by_group], np.arange(n_groups + 1))
        local = np.zeros(self.n_classes, dtype=np.int64)
        for gi in range(n_groups):
            local[by_group[bounds[gi]:bounds[gi + 1]]] = np.arange(bounds[gi + 1] - bounds[gi])
        frozen = np.zeros(self.n_classes, dtype=bool)
        frozen[list(self.class_frozen)] = True
        # readers per group
        consumers: list[set[str]] = [set() for _ in range(n_groups)]
        n_readers = len(self.readers)
        if n_readers:
            ids_of = [np.asarray(r.ids, dtype=np.int64).ravel() for r in self.readers]
            ids = np.concatenate(ids_of)
            reader = np.repeat(np.arange(n_readers, dtype=np.int64), [len(x) for x in ids_of])
            ok = ids >= 0
            names = [r.module or r.node for r in self.readers]
            for pair in _unique_ints(cls_group[labels[ids[ok]]] * n_readers + reader[ok]).tolist():
                consumers[pair // n_readers].add(names[pair % n_readers])
        reasons: list[list[str]] = [[] for _ in range(n_groups)]
        for c in sorted(self.class_frozen, key=lambda c: (cls_group[c], local[c])):
            lst = reasons[cls_group[c]]
            for r in self.class_frozen[c]:
                if r not in lst:
                    lst.append(r)
        groups = []
        for gi in range(n_groups):
            members = by_group[bounds[gi]:bounds[gi + 1]]
            c0 = members[0]
            i0 = int(np.searchsorted(classes_present, c0))
            key = pair_own[seg_start[i0]:seg_start[i0] + seg_len[i0]].tolist()
            position_class: dict[str, np.ndarray] = {}
            for k in key:
                name = self._id_owner[k]
                s0, cnt = self.sources[name]
                lab = labels[s0:s0 + cnt]
                position_class[self.source_name(name)] = np.where(cls_group[lab] == gi, local[lab], -1)
            groups.append(ChannelGroup(gi, [self.source_name(self._id_owner[k]) for k in key], members.tolist(),
                                       position_class, sorted(consumers[gi]), reasons[gi][:6],
                                       members[~frozen[members]].tolist()))
        order_of = self.node_order
        first_node = {}
        for name in self.sources:
            first_node.setdefault(self.source_name(name), order_of.get(name, 0))
        groups.sort(key=lambda g: min(first_node.get(s, 0) for s in g.sources))
        for i, g in enumerate(groups):
            g.index = i
        self.groups = groups

    # -- summaries -------------------------------------------------------------------------
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def summary(self) -> dict[str, Any]:
        conv_channels = 0
        prunable_conv = 0
        frozen_classes = set(self.class_frozen)
        for name, (s, cnt) in self.sources.items():
            mod = self.source_module.get(name)
            if mod is None:
                continue
            conv_channels += cnt
            prunable_conv += int(sum(1 for c in self.labels[s:s + cnt].tolist() if c not in frozen_classes))
        return {
            "groups": len(self.groups),
            "prunable_groups": len(self.prunable_groups()),
            "source_channels": conv_channels,
            "prunable_channels": prunable_conv,
            "prunable_fraction": prunable_conv / conv_channels if conv_channels else 0.0,
            "barriers": len(self.barriers),
            "seconds": self.seconds,
        }

    def frozen_report(self, limit: int = 20) -> list[str]:
        """Why groups are frozen, most frequent reasons first."""
        counts: dict[str, int] = defaultdict(int)
        for g in self.groups:
            if not g.prunable and g.frozen_reasons:
                counts[g.frozen_reasons[0]] += 1
        return [f"{n} group(s): {r}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1])[:limit]]


def segment_sums(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sums of the consecutive runs of ``values`` whose lengths are ``lengths`` (0 for an empty
    run): per-tensor counts over the concatenated positions of many tensors, in one call."""
    out = np.zeros(len(lengths), dtype=np.int64)
    if len(values):
        starts = np.cumsum(lengths) - lengths
        nonempty = lengths > 0
        out[nonempty] = np.add.reduceat(np.asarray(values, dtype=np.int64), starts[nonempty])
    return out


def _unique_ints(x: np.ndarray) -> np.ndarray:
    """``np.unique(x)`` for an integer array through NumPy's sorting path (asking for the counts
    selects it): the default hash-table path of NumPy 2.x is 10–15× slower on these id arrays
    (1.3 ms against 0.1 ms for 17 000 ids)."""
    return np.unique(x, return_counts=True)[0]


def _segment_keys(values: np.ndarray, seg_start: np.ndarray, seg_len: np.ndarray,
                  weights: np.ndarray | None = None) -> np.ndarray:
    """For consecutive runs of ``values`` (``seg_start``/``seg_len``, non-empty, in order), an id per
    run: equal ids exactly when the runs are equal, numbered by first occurrence. Runs are hashed
    (random 64-bit weights, sums wrap) and every run is then compared with its hash class's first
    run; a collision falls back to exact tuple keys. ``weights`` (per value, uint64) replace the
    random ones (tests use them to force collisions)."""
    w = weights if weights is not None else np.random.default_rng(0x9E3779B9).integers(
        1, 2 ** 63, size=int(values.max()) + 1, dtype=np.uint64)
    h = np.add.reduceat(w[values], seg_start) ^ (seg_len.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    rep = first[inverse]
    exact = bool(np.all(seg_len == seg_len[rep]))
    if exact:
        seg = np.repeat(np.arange(len(seg_start)), seg_len)
        offset = np.arange(len(values)) - seg_start[seg]
        exact = bool(np.all(values == values[seg_start[rep[seg]] + offset]))
    if not exact:
        keys: dict[tuple, int] = {}
        return np.array([keys.setdefault(tuple(values[a:a + n].tolist()), len(keys))
                         for a, n in zip(seg_start.tolist(), seg_len.tolist())], dtype=np.int64)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.ravel()]


def _tensor_vals(v: Any) -> list[TensorVal]:
    if isinstance(v, TensorVal):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensor_vals(x)]
    if isinstance(v, dict):
        return [t for x in v.values() for t in _tensor_vals(x)]
    return []


def _first_unknown(v: Any) -> str:
    """The reason of the first Unknown in a nested value (what made it unknown)."""
    if isinstance(v, Unknown):
        return v.reason
    if isinstance(v, (list, tuple)):
        for x in v:
            r = _first_unknown(x)
            if r:
                return r
    if isinstance(v, dict):
        return _first_unknown(list(v.values()))
    return ""


def _has(v: Any, cls) -> bool:
    if isinstance(v, cls):
        return True
    if isinstance(v, (list, tuple)):
        return any(_has(x, cls) for x in v)
    if isinstance(v, dict):
        return any(_has(x, cls) for x in v.values())
    return False


# ------------------------------------------------------------------------------------------
# op tables

_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign,
                nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                nn.FeatureAlphaDropout, nn.Threshold, nn.LogSigmoid, nn.SiLU)
_SPATIAL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
                    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
                    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
                    nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
                    nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)

_UNARY_FUNCS = {F.relu, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh,
                F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.selu, F.celu, F.mish,
                F.softplus, torch.exp, torch.log, torch.abs, torch.neg, torch.sqrt, torch.rsqrt, torch.square,
                F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                torch.dropout, torch.clone, torch.detach, operator.neg, operator.pos, torch.clamp, torch.clip,
                torch.nn.functional.logsigmoid, torch.erf, torch.sin, torch.cos, torch.reciprocal,
                torch.zeros_like, torch.ones_like, torch.empty_like, torch.rand_like, torch.randn_like,
                torch.full_like, torch.sign, torch.floor, torch.ceil, torch.round, torch.nan_to_num}
for _name in ("relu_", "hardtanh_", "leaky_relu_", "elu_", "threshold", "hardsigmoid"):
    if hasattr(F, _name):
        _UNARY_FUNCS.add(getattr(F, _name))
_UNARY_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "log", "abs", "abs_",
                  "neg", "sqrt", "rsqrt", "square", "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_",
                  "clamp_max", "contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to",
                  "type", "type_as", "pow", "pow_", "erf", "reciprocal", "sign", "floor", "ceil", "round",
                  "hardswish", "hardswish_", "softmax_", "zero_", "fill_", "requires_grad_", "cpu", "cuda",
                  "nan_to_num", "exp_", "mul_scalar", "sin", "cos", "gelu", "silu", "silu_", "square_"}
_SPATIAL_FUNCS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                  F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                  F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample, F.upsample_nearest,
                  F.upsample_bilinear, F.lp_pool2d, torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d}
for _name in ("max_pool2d_with_indices", "adaptive_max_pool2d_with_indices"):
    if hasattr(F, _name):
        _SPATIAL_FUNCS.add(getattr(F, _name))

_BINARY_FUNCS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.iadd,
                 operator.isub, operator.imul, operator.itruediv, operator.pow, torch.add, torch.sub, torch.mul,
                 torch.div, torch.true_divide, torch.maximum, torch.minimum, torch.pow, torch.where,
                 torch.subtract, torch.multiply, torch.divide, torch.fmod, torch.remainder, torch.lerp,
                 torch.addcmul, torch.addcdiv, operator.and_, operator.or_, operator.eq, operator.ne,
                 operator.gt, operator.ge, operator.lt, operator.le, torch.eq, torch.gt, torch.lt}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow",
                   "pow_", "where", "masked_fill", "masked_fill_", "lerp", "lerp_", "addcmul", "addcmul_",
                   "expand_as", "type_as", "eq", "gt", "lt", "ge", "le", "ne", "__and__", "__or__", "sub_",
                   "copy_"}
_REDUCE_FUNCS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin",
                 torch.std: "std", torch.var: "var", torch.logsumexp: "logsumexp", torch.prod: "prod",
                 torch.norm: "norm"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod", "norm"}
_SHAPE_FUNCS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.cat, torch.concat,
                torch.split, torch.chunk, torch.squeeze, torch.unsqueeze, torch.narrow, torch.index_select,
                torch.movedim, torch.swapaxes, torch.swapdims, torch.unflatten, torch.t, torch.tensor_split,
                torch.unbind, torch.broadcast_to, torch.stack, torch.select, torch.roll, torch.flip}
_SHAPE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "split", "chunk", "squeeze", "unsqueeze",
                  "narrow", "index_select", "movedim", "swapaxes", "swapdims", "unflatten", "expand",
                  "repeat", "t", "tensor_split", "unbind", "view_as", "reshape_as", "select", "roll", "flip",
                  "broadcast_to", "mT"}
# shape ops whose result depends on the flat (row-major) layout: checked to commute with removal
_LAYOUT_FUNCS = {torch.flatten, torch.reshape, torch.unflatten}
_LAYOUT_METHODS = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"}

_META_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "is_contiguous", "get_device", "element_size",
                 "stride"}


# user/third-party rules: function or module class -> "carry" (per-channel) | "spatial" | "barrier"
CHANNEL_RULES: dict[Any, str] = {}


def register_channel_rule(target: Any, rule: str) -> None:
    """Teach the channel analysis a function or module class: ``"carry"`` (acts on each channel
    independently and keeps the layout), ``"spatial"`` (like pooling: channels on dim 1) or
    ``"barrier"`` (freeze everything it touches)."""
    if rule not in ("carry", "spatial", "barrier"):
        raise ValueError(f"rule must be 'carry', 'spatial' or 'barrier', got {rule!r}")
    CHANNEL_RULES[target] = rule


def _register_known_libraries() -> None:
    try:
        import torchvision.ops
        register_channel_rule(torchvision.ops.stochastic_depth, "carry")   # per-sample scaling
    except Exception:  # noqa: BLE001 - torchvision is optional
        pass


_register_known_libraries()


def indexed_dims(items: tuple | list, rank: int):
    """For a basic index tuple (ints, slices, None, Ellipsis): ``(position in the tuple, input
    dimension, item)`` for every item that addresses an input dimension."""
    dim = 0
    n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
    for k, it in enumerate(items):
        if it is Ellipsis:
            dim += rank - n_real
            continue
        if it is None:
            continue
        yield k, dim, it
        dim += 1


def _fn_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# ------------------------------------------------------------------------------------------
# the interpreter


class _Analyzer:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.a = ChannelAnalysis(gm)
        self.modules = module_index(gm)
        self._sizes_before = SizeInt.created
        self.call_sites: dict[str, int] = defaultdict(int)
        for n in gm.graph.nodes:
            if n.op == "call_module":
                self.call_sites[n.target] += 1

    # -- helpers --------------------------------------------------------------------------
    def val(self, x: Any) -> Any:
        if isinstance(x, fx.Node):
            return self.a.values[x.name]
        if isinstance(x, (list, tuple)):
            vals = [self.val(e) for e in x]
            return type(x)(vals) if not hasattr(x, "_fields") else type(x)(*vals)
        if isinstance(x, dict):
            return {k: self.val(v) for k, v in x.items()}
        if isinstance(x, slice):
            return slice(self.val(x.start), self.val(x.stop), self.val(x.step))
        return x

    def out_shape(self, node: fx.Node) -> tuple[int, ...] | None:
        return tensor_shape(node)

    def run(self) -> ChannelAnalysis:
        t0 = time.perf_counter()
        for node in self.gm.graph.nodes:
            try:
                v = self.visit(node)
            except Exception as e:  # noqa: BLE001 - an op we mis-modelled becomes a barrier, never a crash
                args = self.val(node.args) if node.op != "output" else None
                v = self.a.barrier(node, f"channel analysis failed on {_fn_name(node)}: {type(e).__name__}: {e}", args)
            if node.op in ("call_function", "call_method", "call_module"):
                v = self.track_sizes(node, v)
            self.a.values[node.name] = v
        self.a.finalize()
        self.a.seconds = time.perf_counter() - t0
        return self.a

    def track_sizes(self, node: fx.Node, v: Any) -> Any:
        """Follow channel counts (:class:`SizeInt`) through arithmetic and into shape ops."""
        if SizeInt.created == self._sizes_before:          # no channel count read so far
            return v
        size_ids = _size_ids([self.val(node.args), self.val(node.kwargs)])
        if not size_ids:
            return v
        ids = np.unique(np.concatenate(size_ids))
        if node.target is operator.getitem and isinstance(self.val(node.args[0]), (tuple, list)):
            return v                       # an element keeps (or lacks) its own channel-count tag
        if isinstance(v, int) and not isinstance(v, bool):
            return SizeInt(int(v), ids)
        if isinstance(v, tuple) and all(isinstance(e, int) for e in v) and node.target is operator.getitem:
            return v
        first = self.val(node.args[0]) if node.args else None
        name = node.target if node.op == "call_method" else node.target
        is_shape = (node.op == "call_method" and name in _SHAPE_METHODS) or (node.op == "call_function" and name in _SHAPE_FUNCS) \
            or name is operator.getitem
        if is_shape and isinstance(first, TensorVal) and first.has_channels and not _size_ids(first):
            self.a._size_uses.append((node, ids, first.ids))
        elif isinstance(first, (tuple, list)) and name is operator.getitem:
            return v
        else:
            self.a._size_uses.append((node, ids, None))
        return v

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            shape = self.out_shape(node)
            if shape is None:
                return Unknown("non-tensor input")
            return _plain(shape)      # model inputs carry no removable channels
        if node.op == "get_attr":
            shape = self.out_shape(node)
            obj = self._attr(node.target)
            if isinstance(obj, torch.Tensor):
                return ParamVal(node.target, tuple(obj.shape))
            return obj
        if node.op == "output":
            self.a.freeze_value(self.val(node.args), "model output")
            return None
        args = self.val(node.args)
        kwargs = self.val(node.kwargs)
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target], args, kwargs)
        if node.op == "call_function":
            return self.visit_function(node, node.target, args, kwargs)
        if node.op == "call_method":
            return self.visit_method(node, node.target, args, kwargs)
        return self.a.barrier(node, f"unknown node kind {node.op}", args)

    def _attr(self, target: str) -> Any:
        obj: Any = self.gm
        for p in target.split("."):
            obj = getattr(obj, p)
        return obj

    # -- generic behaviours ---------------------------------------------------------------
    def carry(self, node: fx.Node, x: Any, channel_dim: int | None = None) -> Any:
        """Per-channel op: output has the input's ids (shape from tensor_meta)."""
        shape = self.out_shape(node)
        if isinstance(x, Unknown):
            return x
        if isinstance(x, ParamVal):
            x = _plain(x.shape)
        if not isinstance(x, TensorVal):
            return self.concrete_or_unknown(node)
        if shape is None:
            shape = x.shape
        if x.dim is None:
            return _plain(shape)
        if len(shape) != len(x.shape) or shape[x.dim] != x.shape[x.dim]:
            return self.a.barrier(node, f"{_fn_name(node)} changes the channel dimension", x)
        if channel_dim is not None and x.dim != _norm_dim(channel_dim, len(x.shape)):
            return self.a.barrier(node, f"{_fn_name(node)} works on dimension {channel_dim} but channels are on {x.dim}", x)
        return TensorVal(shape, x.dim, x.ids)

    def concrete_or_unknown(self, node: fx.Node) -> Any:
        shape = self.out_shape(node)
        if shape is not None:
            return _plain(shape)
        return Unknown(f"value of {_fn_name(node)}")

    def unknown_op(self, node: fx.Node, args: Any, kwargs: Any, what: str) -> Any:
        vals = [args, kwargs]
        if _has(vals, Unknown):
            tv = _tensor_vals(vals)
            if any(t.has_channels for t in tv):
                self.a.barrier(node, f"{what} {_fn_name(node)} mixes channels with the output of "
                                     f"{_first_unknown(vals)}", vals)
            return Unknown(_first_unknown(vals))          # keep the root cause
        tvals = [t for t in _tensor_vals(vals) if t.has_channels]
        if tvals:
            return self.a.barrier(node, f"{what} {_fn_name(node)} is not understood", vals)
        # only plain tensors / params / python values: a plain result
        shape = self.out_shape(node)
        if shape is not None:
            return _plain(shape)
        if not _has(vals, (TensorVal, ParamVal)):
            try:
                return self.python_call(node, args, kwargs)
            except Exception:  # noqa: BLE001
                pass
        return Unknown(f"result of {_fn_name(node)}")

    def python_call(self, node: fx.Node, args, kwargs):
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise TypeError("not a python call")

    # -- elementwise ----------------------------------------------------------------------
    def elementwise(self, node: fx.Node, operands: list[Any]) -> Any:
        shape = self.out_shape(node)
        if shape is None:
            # scalar arithmetic, e.g. on sizes
            if not any(isinstance(o, (TensorVal, ParamVal, Unknown)) for o in operands):
                raise _PythonOp()
            return self.unknown_op(node, operands, {}, "element-wise op")
        if any(isinstance(o, Unknown) for o in operands):
            self.a.barrier(node, f"{_fn_name(node)} combines channels with the output of "
                                 f"{_first_unknown(operands)}", operands)
            return Unknown(_first_unknown(operands))
        rank = len(shape)
        out_dim = None
        chans = []
        for o in operands:
            if isinstance(o, TensorVal) and o.has_channels:
                d = o.dim + rank - len(o.shape)
                if o.shape[o.dim] == shape[d] and (shape[d] > 1 or o.shape[o.dim] == 1):
                    chans.append((o, d))
        dims = {d for _, d in chans if shape[d] > 1} or {d for _, d in chans}
        if len(dims) > 1:
            return self.a.barrier(node, f"{_fn_name(node)} aligns channels of different dimensions", operands)
        if not dims:
            # nothing carries channels at full size: broadcast reads only
            for o in operands:
                if isinstance(o, TensorVal) and o.has_channels:
                    self.a.readers.append(Reader(node.name, "broadcast", o.ids))
            return _plain(shape)
        out_dim = dims.pop()
        full = [(o, d) for o, d in chans if d == out_dim]
        ids = full[0][0].ids
        for o, _ in full[1:]:
            self.a.union(ids, o.ids)
            # positions without channel in one operand pin the other's ids
            mixed = (ids < 0) != (o.ids < 0)
            if mixed.any():
                self.a.freeze(np.concatenate([ids[mixed], o.ids[mixed]]), f"{_fn_name(node)} adds data graphsel cannot slice")
        for o in operands:
            if isinstance(o, TensorVal):
                if o.has_channels and not any(o is c for c, _ in full):
                    self.a.readers.append(Reader(node.name, "broadcast", o.ids))
                elif not o.has_channels:
                    d = out_dim - (rank - len(o.shape))
                    if d >= 0 and o.shape[d] == shape[out_dim] and shape[out_dim] > 1:
                        self.a.freeze(ids, f"{_fn_name(node)} combines channels with a tensor graphsel cannot slice (node {node.name})")
            elif isinstance(o, ParamVal):
                d = out_dim - (rank - len(o.shape))
                if d >= 0 and o.shape[d] == shape[out_dim] and shape[out_dim] > 1:
                    self.a.add_slot(("param", o.target, d), ids, node)
        return TensorVal(shape, out_dim, ids)

    # -- shape ops ------------------------------------------------------------------------
    def shape_op(self, node: fx.Node, fn: Callable, args: Any, kwargs: Any, layout: bool) -> Any:
        vals = [args, kwargs]
        if _has(vals, Unknown):
            return self.unknown_op(node, args, kwargs, "shape op")
        tvals = _tensor_vals(vals)
        if not any(t.has_channels for t in tvals):
            shape = self.out_shape(node)
            if shape is not None:
                return _plain(shape)
            return Unknown("shape op result")
        def conv(v):
            if isinstance(v, TensorVal):
                return v.full()
            if isinstance(v, ParamVal):
                real = self._attr(v.target)
                if not real.is_floating_point() and not real.is_complex():
                    return real          # an index tensor (e.g. a gather's positions)
                return torch.full(v.shape, -1, dtype=torch.int64)
            return v
        fargs = _map(args, conv)
        fkwargs = _map(kwargs, conv)
        out = fn(*fargs, **fkwargs)
        allowed = self.dynamic_size_dims(node, args, kwargs)
        return _map_results(out, lambda t: self.from_full(node, t, tvals, layout, allowed))

    def cat_along_channels(self, node: fx.Node, args, kwargs) -> TensorVal | None:
        """Fast path of the common concat (DenseNet, Inception): every input carries channels on
        the concatenated dimension, or none (its positions get -1)."""
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        shape = self.out_shape(node)
        if not isinstance(tensors, (list, tuple)) or shape is None or not isinstance(dim, int):
            return None
        dim = _norm_dim(dim, len(shape))
        parts = []
        for t in tensors:
            if not isinstance(t, TensorVal) or len(t.shape) != len(shape):
                return None
            if t.has_channels:
                if t.dim != dim:
                    return None
                parts.append(t.ids)
            else:
                parts.append(np.full(t.shape[dim], -1, dtype=np.int64))
        if not any(t.has_channels for t in tensors):
            return None
        return TensorVal(shape, dim, np.concatenate(parts))

    @staticmethod
    def dynamic_size_dims(node: fx.Node, args, kwargs) -> set[int] | None:
        """For view/reshape/expand: the output dims whose size is computed (-1, or derived from a
        channel count). When there are any, the channel dimension must be one of them: a literal
        size next to a computed one would disagree after pruning."""
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if name not in ("view", "reshape", "expand", "broadcast_to"):
            return None
        rest = list(args[1:])
        sizes = kwargs.get("size", kwargs.get("shape"))
        if sizes is None:
            sizes = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        dyn = {d for d, v in enumerate(sizes) if isinstance(v, SizeInt) or (isinstance(v, int) and v == -1 and name in ("view", "reshape"))}
        return dyn or None

    def from_full(self, node: fx.Node, full: torch.Tensor, inputs: list[TensorVal], layout: bool,
                  allowed: set[int] | None = None) -> TensorVal:
        """Read a shape op's id tensor back: choose its channel dimension, union ids within each
        slice along it (so any removal stays rectangular), freeze what cannot be sliced."""
        shape = tuple(full.shape)
        if full.dim() == 0:
            i = int(full.item())
            if i >= 0:
                self.a.freeze([i], f"{_fn_name(node)} selects a single element")
            return _plain(shape)
        if (full < 0).all():
            return _plain(shape)
        lines_of = [full.movedim(d, 0).reshape(shape[d], -1) for d in range(full.dim())]
        best = None
        for d, lines in enumerate(lines_of):
            if lines.shape[1] == 0 or (allowed is not None and d not in allowed):
                continue
            if bool((lines == lines[:, :1]).all()):
                col = lines[:, 0]
                distinct = len(torch.unique(col[col >= 0]))
                score = (distinct > 1, distinct, shape[d])
                if best is None or score > best[0]:
                    best = (score, d)
        if best is not None and (best[0][0] or len(torch.unique(full[full >= 0])) == 1):
            # a clean channel dimension (or a tensor holding one single channel class)
            d = best[1]
            if not best[0][0]:
                same = [t.dim for t in inputs if t.has_channels and len(t.shape) == len(shape)]
                d = same[0] if same and (allowed is None or same[0] in allowed) and bool((lines_of[same[0]] == lines_of[same[0]][:, :1]).all()) else d
            ids = lines_of[d][:, 0].numpy().astype(np.int64, copy=True)
            result = TensorVal(shape, d, ids)
        else:
            # no clean channel dimension: pick the one whose slices merge the fewest ids
            cand = None
            for d, lines in enumerate(lines_of):
                if shape[d] < 2 or (allowed is not None and d not in allowed):
                    continue
                merges = sum(len(torch.unique(l[l >= 0])) for l in lines) - shape[d]
                if cand is None or (merges, -shape[d]) < cand[0]:
                    cand = ((merges, -shape[d]), d)
            if cand is None:
                d = best[1] if best is not None else (min(allowed) if allowed else 0)
            else:
                d = cand[1]
            lines = lines_of[d]
            ids = np.full(shape[d], -1, dtype=np.int64)
            for i in range(shape[d]):
                u = torch.unique(lines[i])
                pos = u[u >= 0].numpy()
                if len(pos) == 0:
                    continue
                ids[i] = pos[0]
                if len(pos) > 1:
                    self.a.union(np.full(len(pos) - 1, pos[0]), pos[1:])
                if (u < 0).any():
                    self.a.freeze(pos, f"{_fn_name(node)} mixes channels with data graphsel cannot slice (node {node.name})")
            if len(np.unique(ids[ids >= 0])) <= 1 and shape[d] > 1:
                self.a.freeze(ids, f"{_fn_name(node)} scatters channels across dimensions (node {node.name})")
            result = TensorVal(shape, d, ids)
        if layout:
            src = [t for t in inputs if t.has_channels]
            if len(src) == 1:
                self.a._layout_checks.append((node, src[0], result))
        return result

    # -- modules --------------------------------------------------------------------------
    def apply_rule(self, node, rule, x, args, kwargs):
        if rule == "carry":
            return self.carry(node, x)
        if rule == "spatial":
            return self.spatial(node, x)
        return self.a.barrier(node, f"{_fn_name(node)} is registered as a barrier", [args, kwargs])

    def visit_module(self, node: fx.Node, m: nn.Module, args, kwargs) -> Any:
        x = args[0] if args else next(iter(kwargs.values()), None)
        path = node.target
        for cls in type(m).__mro__:
            if cls in CHANNEL_RULES:
                return self.apply_rule(node, CHANNEL_RULES[cls], x, args, kwargs)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return self.conv(node, m, x, path)
        if isinstance(m, nn.Linear):
            return self.linear(node, m, x, path)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            v = self.carry(node, x, 1)
            if isinstance(v, TensorVal) and v.has_channels:
                self.a.add_slot(("module", path, "chan"), v.ids, node)
            return v
        if isinstance(m, nn.modules.instancenorm._InstanceNorm):
            v = self.carry(node, x, 1)
            if isinstance(v, TensorVal) and v.has_channels and (m.affine or m.track_running_stats):
                self.a.add_slot(("module", path, "chan"), v.ids, node)
            return v
        if isinstance(m, nn.GroupNorm):
            return self.group_norm(node, m, x, path)
        if isinstance(m, nn.LayerNorm):
            return self.layer_norm(node, m, x, path)
        if isinstance(m, nn.PReLU):
            v = self.carry(node, x, 1 if m.num_parameters > 1 else None)
            if isinstance(v, TensorVal) and v.has_channels and m.num_parameters > 1:
                self.a.add_slot(("module", path, "chan"), v.ids, node)
            return v
        if isinstance(m, _ACT_MODULES):
            return self.carry(node, x)
        if isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
            return self.softmax(node, x, m.dim)
        if isinstance(m, _SPATIAL_MODULES):
            return self.spatial(node, x)
        if isinstance(m, nn.Flatten):
            return self.shape_op(node, lambda t: torch.flatten(t, m.start_dim, m.end_dim), [x], {}, True)
        if isinstance(m, nn.Unflatten):
            return self.shape_op(node, lambda t: t.unflatten(m.dim, m.unflattened_size), [x], {}, True)
        if isinstance(m, nn.ChannelShuffle):
            return self.channel_shuffle(node, x, m.groups)
        return self.a.barrier(node, f"opaque module {type(m).__name__} at '{path}'", [args, kwargs])

    def conv(self, node, m, x, path):
        shape = self.out_shape(node)
        if isinstance(x, Unknown) or not isinstance(x, TensorVal):
            out = self.a.new_ids(node, m.out_channels, path)
            self._group_outputs(m, out)
            self.a.add_slot(("module", path, "out"), out, node)
            return TensorVal(shape, 1, out)
        g = m.groups
        if x.has_channels and x.dim != 1:
            self.a.freeze(x.ids, f"'{path}' reads channels from dimension {x.dim}")
        in_ids = x.ids if x.has_channels and x.dim == 1 else np.full(m.in_channels, -1, dtype=np.int64)
        if g > 1 and g == m.in_channels == m.out_channels:
            # depthwise, multiplier 1: a per-channel op
            self.a.add_slot(("module", path, "chan"), in_ids, node)
            return TensorVal(shape, 1, in_ids)
        if g > 1:
            per = m.in_channels // g
            blocks = in_ids.reshape(g, per)
            for k in range(1, g):
                self.a.union(blocks[0], blocks[k])
                mixed = (blocks[0] < 0) != (blocks[k] < 0)
                if mixed.any():
                    self.a.freeze(np.concatenate([blocks[0][mixed], blocks[k][mixed]]), f"grouped conv '{path}' reads unsliceable data")
        self.a.readers.append(Reader(node.name, "conv_in", in_ids, path))
        self.a.add_slot(("module", path, "in"), in_ids, node)
        out = self.a.new_ids(node, m.out_channels, path)
        self._group_outputs(m, out)
        self.a.add_slot(("module", path, "out"), out, node)
        return TensorVal(shape, 1, out)

    def _group_outputs(self, m, out):
        g = getattr(m, "groups", 1)
        if g > 1:
            blocks = out.reshape(g, -1)
            for k in range(1, g):
                self.a.union(blocks[0], blocks[k])

    def linear(self, node, m, x, path):
        shape = self.out_shape(node)
        if isinstance(x, TensorVal) and x.has_channels and x.dim != len(x.shape) - 1:
            # channels elsewhere: the linear maps each channel position independently
            if shape is not None and len(shape) == len(x.shape):
                return TensorVal(shape, x.dim, x.ids)
            return self.a.barrier(node, f"'{path}' changes the channel layout", x)
        in_ids = x.ids if isinstance(x, TensorVal) and x.has_channels else np.full(m.in_features, -1, dtype=np.int64)
        if isinstance(x, TensorVal):
            self.a.readers.append(Reader(node.name, "linear_in", in_ids, path))
            self.a.add_slot(("module", path, "in"), in_ids, node)
        out = self.a.new_ids(node, m.out_features, path)
        self.a.add_slot(("module", path, "out"), out, node)
        return TensorVal(shape, len(shape) - 1, out)

    def group_norm(self, node, m, x, path):
        v = self.carry(node, x, 1)
        if not (isinstance(v, TensorVal) and v.has_channels):
            return v
        g, c = m.num_groups, m.num_channels
        if g == 1:
            self.a.readers.append(Reader(node.name, "reduce", v.ids, path, keeps_channels=True))
        elif g != c:
            blocks = v.ids.reshape(g, c // g)
            for k in range(1, c // g):
                self.a.union(blocks[:, 0], blocks[:, k])
            self.a.readers.append(Reader(node.name, "reduce", v.ids, path, keeps_channels=True))
        if m.affine:
            self.a.add_slot(("module", path, "chan"), v.ids, node)
        return v

    def layer_norm(self, node, m, x, path):
        if not (isinstance(x, TensorVal) and x.has_channels):
            return self.carry(node, x)
        nd = len(m.normalized_shape)
        rank = len(x.shape)
        if x.dim < rank - nd:
            return self.carry(node, x)            # normalises over non-channel dims only
        if nd != 1:
            return self.a.barrier(node, f"LayerNorm '{path}' normalises over channels and other dimensions", x)
        self.a.readers.append(Reader(node.name, "reduce", x.ids, path, keeps_channels=True))
        if m.elementwise_affine:
            self.a.add_slot(("module", path, "chan"), x.ids, node)
        return TensorVal(self.out_shape(node) or x.shape, x.dim, x.ids)

    def softmax(self, node, x, dim):
        if not (isinstance(x, TensorVal) and x.has_channels) or dim is None:
            return self.carry(node, x) if dim is not None else self.a.barrier(node, "softmax without dim", x)
        if _norm_dim(dim, len(x.shape)) == x.dim:
            self.a.readers.append(Reader(node.name, "reduce", x.ids, keeps_channels=True))
        return self.carry(node, x)

    def spatial(self, node, x):
        if isinstance(x, TensorVal) and x.has_channels and x.dim != 1:
            return self.a.barrier(node, f"{_fn_name(node)} pools over the channel dimension", x)
        return self.carry(node, x)

    def channel_shuffle(self, node, x, g):
        """view(N, g, C/g, ...) → transpose(1, 2) → view(N, C, ...), through the shape-op machinery."""
        if not (isinstance(x, TensorVal) and x.has_channels and x.dim == 1):
            return self.carry(node, x) if not (isinstance(x, TensorVal) and x.has_channels) else \
                self.a.barrier(node, "channel shuffle of a non-channel dimension", x)
        n, c = x.shape[:2]
        mid = self.from_full(node, x.full().reshape(n, g, c // g, *x.shape[2:]), [x], True)
        if mid.dim is None:
            return _plain(x.shape)
        mid_t = self.from_full(node, mid.full().transpose(1, 2), [mid], False)
        return self.from_full(node, mid_t.full().reshape(x.shape), [mid_t], True)

    # -- functions ------------------------------------------------------------------------
    def visit_function(self, node: fx.Node, fn: Any, args, kwargs) -> Any:
        if fn in CHANNEL_RULES:
            return self.apply_rule(node, CHANNEL_RULES[fn], args[0] if args else None, args, kwargs)
        if fn is getattr and len(args) == 2 and isinstance(args[1], str):
            return self.attribute(node, args[0], args[1])
        if fn is operator.getitem:
            return self.getitem(node, args[0], args[1])
        if fn in _UNARY_FUNCS or fn in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax):
            if fn in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax):
                dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
                return self.softmax(node, args[0], dim)
            return self.carry(node, args[0] if args else kwargs.get("input"))
        if fn in _SPATIAL_FUNCS:
            x = args[0] if args else kwargs.get("input")
            r = self.spatial(node, x)
            if isinstance(r, TensorVal) and r.has_channels and node.meta.get("tensor_meta") is None:
                return r
            return r
        if fn is F.pad:
            return self.pad(node, args, kwargs)
        if fn is F.batch_norm:
            return self.functional_norm(node, args, kwargs, ("running_mean", "running_var", "weight", "bias"), 1)
        if fn is F.layer_norm:
            return self.functional_layer_norm(node, args, kwargs)
        if fn is F.group_norm:
            x = args[0]
            return self.a.barrier(node, "functional group_norm", [args, kwargs]) if isinstance(x, TensorVal) and x.has_channels else self.carry(node, x)
        if fn in (F.conv1d, F.conv2d, F.conv3d, F.linear):
            return self.functional_layer(node, fn, args, kwargs)
        if fn in _REDUCE_FUNCS:
            return self.reduce(node, args, kwargs)
        if fn in (torch.max, torch.min) and len(args) >= 2 and isinstance(args[1], int):
            return self.reduce(node, args, kwargs)
        if fn in (torch.max, torch.min) and len(args) == 2:
            return self.elementwise(node, list(args))
        if fn in _BINARY_FUNCS:
            try:
                return self.elementwise(node, list(args) + [v for k, v in kwargs.items() if k in ("other", "input", "alpha")])
            except _PythonOp:
                return fn(*args, **kwargs)
        if fn in (torch.cat, torch.concat):
            fast = self.cat_along_channels(node, args, kwargs)
            if fast is not None:
                return fast
        if fn in _SHAPE_FUNCS:
            layout = fn in _LAYOUT_FUNCS
            return self.shape_op(node, fn, args, kwargs, layout)
        if fn is torch.nn.functional.channel_shuffle or fn is getattr(torch, "channel_shuffle", None):
            return self.channel_shuffle(node, args[0], args[1])
        if fn in (torch.numel, len) and isinstance(args[0], TensorVal):
            return math.prod(args[0].shape) if fn is torch.numel else args[0].shape[0]
        if fn is torch._assert or getattr(fn, "__name__", "") in ("_assert", "_assert_async"):
            return None
        if not _has([args, kwargs], (TensorVal, ParamVal, Unknown)):
            try:
                return fn(*args, **kwargs)
            except Exception:  # noqa: BLE001
                return Unknown(f"result of {_fn_name(node)}")
        return self.unknown_op(node, args, kwargs, "function")

    def attribute(self, node, x, name):
        if isinstance(x, TensorVal):
            if name == "shape":
                return _shape_of(x)
            if name == "ndim":
                return len(x.shape)
            if name in ("dtype", "device", "is_cuda", "requires_grad"):
                tm = node.args[0].meta.get("tensor_meta")
                return getattr(tm, name, None) if tm is not None and name != "device" else Unknown(name)
            if name in ("T", "mT"):
                return self.shape_op(node, lambda t: getattr(t, name), [x], {}, False)
        if isinstance(x, ParamVal) and name == "shape":
            return torch.Size(x.shape)
        if isinstance(x, (TensorVal, ParamVal, Unknown)):
            return Unknown(f"attribute {name}")
        try:
            return getattr(x, name)
        except Exception:  # noqa: BLE001
            return Unknown(f"attribute {name}")

    def getitem(self, node, x, idx):
        if isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
            return x[idx] if isinstance(idx, (int, slice)) else Unknown("getitem")
        if isinstance(x, torch.Size) or isinstance(x, (int, str, dict)):
            try:
                return x[idx]
            except Exception:  # noqa: BLE001
                return Unknown("getitem")
        if isinstance(x, Unknown):
            return x
        if isinstance(x, ParamVal):
            x = _plain(x.shape)
        if not isinstance(x, TensorVal):
            return Unknown("getitem")
        if not x.has_channels:
            return _plain(self.out_shape(node) or ())
        items = idx if isinstance(idx, tuple) else (idx,)
        if _has(items, (TensorVal, ParamVal, Unknown)):
            return self.a.barrier(node, "advanced indexing of channels", [x, idx])
        for _, dim, it in indexed_dims(items, len(x.shape)):
            if dim == x.dim and isinstance(it, int):
                self.a.readers.append(Reader(node.name, "select", x.ids[[it]]))
                self.a.freeze(x.ids[[it]], f"a single channel is selected by index at node {node.name}")
                return _plain(self.out_shape(node) or ())
            if dim == x.dim and isinstance(it, slice) and it.step not in (None, 1):
                return self.a.barrier(node, "strided slicing of channels", x)
        return self.shape_op(node, operator.getitem, [x, idx], {}, False)

    def pad(self, node, args, kwargs):
        x = args[0]
        pad = args[1] if len(args) > 1 else kwargs.get("pad")
        if isinstance(x, TensorVal) and x.has_channels and isinstance(pad, (list, tuple)):
            padded_dims = {len(x.shape) - 1 - i // 2 for i, p in enumerate(pad) if p}
            if x.dim in padded_dims:
                return self.a.barrier(node, "padding of the channel dimension", x)
        return self.carry(node, x)

    def reduce(self, node, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        shape = self.out_shape(node)
        if not (isinstance(x, TensorVal) and x.has_channels):
            if isinstance(x, Unknown):
                return x
            return _plain(shape) if shape is not None else self.unknown_op(node, args, kwargs, "reduction")
        rank = len(x.shape)
        if dims is None:
            dims = list(range(rank))
        if isinstance(dims, int):
            dims = [dims]
        dims = {_norm_dim(d, rank) for d in dims}
        keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
        multi = node.target in (torch.max, torch.min) or node.target in ("max", "min")
        if x.dim in dims:
            self.a.readers.append(Reader(node.name, "reduce", x.ids))
            if shape is None and multi:
                return (Unknown("reduction values"), Unknown("reduction indices"))
            return _plain(shape) if shape is not None else Unknown("reduction")
        new_dim = x.dim if keepdim else x.dim - sum(1 for d in dims if d < x.dim)
        if multi:
            vals_shape = tuple(s for i, s in enumerate(x.shape) if i not in dims or keepdim) if not keepdim else \
                tuple(1 if i in dims else s for i, s in enumerate(x.shape))
            v = TensorVal(vals_shape, new_dim, x.ids)
            return (v, _plain(vals_shape))
        return TensorVal(shape, new_dim, x.ids)

    def functional_norm(self, node, args, kwargs, names, dim):
        x = args[0]
        v = self.carry(node, x, dim)
        if isinstance(v, TensorVal) and v.has_channels:
            params = list(args[1:5]) + [kwargs.get(n) for n in names[len(args) - 1:]]
            for p in params:
                if isinstance(p, ParamVal):
                    self.a.add_slot(("param", p.target, 0), v.ids, node)
                elif isinstance(p, TensorVal):
                    return self.a.barrier(node, "batch_norm with computed statistics", [args, kwargs])
        return v

    def functional_layer_norm(self, node, args, kwargs):
        x = args[0]
        shape_arg = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        weight = args[2] if len(args) > 2 else kwargs.get("weight")
        bias = args[3] if len(args) > 3 else kwargs.get("bias")
        if not (isinstance(x, TensorVal) and x.has_channels):
            return self.carry(node, x)
        nd = len(shape_arg) if isinstance(shape_arg, (list, tuple, torch.Size)) else 1
        if x.dim < len(x.shape) - nd:
            return self.carry(node, x)
        if nd != 1 or any(isinstance(p, (TensorVal, Unknown)) for p in (weight, bias)):
            return self.a.barrier(node, "layer_norm over channels and other dimensions", [args, kwargs])
        self.a.readers.append(Reader(node.name, "reduce", x.ids, keeps_channels=True))
        for p in (weight, bias):
            if isinstance(p, ParamVal):
                self.a.add_slot(("param", p.target, 0), x.ids, node)
        return TensorVal(self.out_shape(node) or x.shape, x.dim, x.ids)

    def functional_layer(self, node, fn, args, kwargs):
        x = args[0]
        if isinstance(x, TensorVal) and x.has_channels:
            return self.a.barrier(node, f"functional {fn.__name__} with channel inputs", [args, kwargs])
        shape = self.out_shape(node)
        return _plain(shape) if shape is not None else Unknown(fn.__name__)

    # -- methods --------------------------------------------------------------------------
    def visit_method(self, node: fx.Node, name: str, args, kwargs) -> Any:
        self_val = args[0] if args else None
        if name in _META_METHODS:
            if isinstance(self_val, (TensorVal, ParamVal)):
                shape = self_val.shape
                if name == "size":
                    d = args[1] if len(args) > 1 else kwargs.get("dim")
                    full = _shape_of(self_val) if isinstance(self_val, TensorVal) else tuple(shape)
                    return full if d is None else full[d]
                if name in ("dim", "ndimension"):
                    return len(shape)
                if name in ("numel", "nelement"):
                    return math.prod(shape)
                return Unknown(name)
            return self_val if isinstance(self_val, Unknown) else Unknown(name)
        if name in _UNARY_METHODS:
            return self.carry(node, self_val)
        if name in ("softmax", "log_softmax"):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            return self.softmax(node, self_val, dim)
        if name in _REDUCE_METHODS or (name in ("max", "min") and (len(args) > 1 or "dim" in kwargs)):
            return self.reduce(node, args, kwargs)
        if name in _BINARY_METHODS:
            if name in ("expand_as",):
                return self.shape_op(node, lambda t, o: t.expand_as(o), args, kwargs, False)
            if name == "copy_":
                return self.elementwise(node, list(args))
            try:
                return self.elementwise(node, list(args) + list(kwargs.values()))
            except _PythonOp:
                return getattr(args[0], name)(*args[1:], **kwargs)
        if name in _SHAPE_METHODS:
            layout = name in _LAYOUT_METHODS
            return self.shape_op(node, lambda t, *a, **k: getattr(t, name)(*a, **k), args, kwargs, layout)
        if not _has([args, kwargs], (TensorVal, ParamVal, Unknown)):
            try:
                return getattr(args[0], name)(*args[1:], **kwargs)
            except Exception:  # noqa: BLE001
                return Unknown(f"result of .{name}()")
        return self.unknown_op(node, args, kwargs, "method")


class _PythonOp(Exception):
    """Raised when an 'element-wise' op turns out to be plain Python arithmetic (sizes)."""


def _map(v: Any, fn: Callable) -> Any:
    if isinstance(v, (TensorVal, ParamVal)):
        return fn(v)
    if isinstance(v, list):
        return [_map(e, fn) for e in v]
    if isinstance(v, tuple) and not isinstance(v, torch.Size):
        return tuple(_map(e, fn) for e in v)
    if isinstance(v, dict):
        return {k: _map(e, fn) for k, e in v.items()}
    return v


def _map_results(out: Any, fn: Callable) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (list, tuple)):
        return type(out)(_map_results(o, fn) for o in out) if not hasattr(out, "_fields") else tuple(_map_results(o, fn) for o in out)
    return out


def analyze_channels(gm: fx.GraphModule) -> ChannelAnalysis:
    """Channel classes, groups, readers, slots and barriers of a traced graph with shapes.

    Requires ``node.meta["tensor_meta"]`` (``graphsel.trace`` with example inputs provides it).
    """
    if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
        raise ValueError("channel analysis needs shapes: trace the model with example inputs "
                         "(graphsel.trace(model, example_inputs)) first")
    return _Analyzer(gm).run()
