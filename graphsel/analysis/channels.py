"""Channel analysis: which channel positions of a graph must be kept or removed together.

Abstract interpretation over a traced graph with shapes, dispatched through the operator table
(:mod:`graphsel.ops`): every call node's ``OpSpec.channels`` rule computes the node's abstract
value from its arguments' (:mod:`graphsel.ops.channel` describes the values and the building
blocks). An operator without a channel rule — an opaque leaf module, an unknown function — is a
**barrier**: every id reaching it is frozen, with the reason recorded. Unknown never means
pass-through.

Ids that meet are unioned into **channel classes** (connected components); a class is removed
as a whole. Classes with the same set of producing sources form a :class:`ChannelGroup`.
Parameters and modules that have one entry per channel are **slots**: the ids at each of their
positions (all call sites unioned), so slicing them is consistent by construction.
"""
from __future__ import annotations

import operator
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.fx as fx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from graphsel.ir.graph import module_index
from graphsel.ir.shapes import tensor_shape
from graphsel.ops import channel as ch
from graphsel.ops.channel import ParamVal, Reader, SizeInt, TensorVal, Unknown
from graphsel.ops.table import spec_of


# ------------------------------------------------------------------------------------------
# results


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
        for t in ch.tensor_vals(v):
            if t.has_channels:
                self.freeze(t.ids, reason)

    def barrier(self, node: fx.Node, reason: str, args: Any) -> Unknown:
        self.barriers.append((node.name, reason))
        self.freeze_value(args, f"{reason} (node {node.name})")
        return Unknown(reason if "(node " in reason else f"{reason} (node {node.name})")

    def check_layout(self, node: fx.Node, x: TensorVal, out: TensorVal) -> None:
        """Check, once the classes are known, that the view-like ``node`` commutes with removal."""
        self._layout_checks.append((node, x, out))

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
                self.freeze(size_ids, f"a channel count is used to shape other data at {ch.fn_name(node)} (node {node.name})")
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
                            f"{ch.fn_name(node)} reshapes channels in a way that does not survive removal (node {node.name})")
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


# ------------------------------------------------------------------------------------------
# the driver


class _Analyzer:
    """Runs the channel rules of the operator table over a graph (the ``cx`` the rules receive)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.a = ChannelAnalysis(gm)
        self.modules = module_index(gm)
        self._sizes_before = SizeInt.created

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

    def attr(self, target: str) -> Any:
        obj: Any = self.gm
        for p in target.split("."):
            obj = getattr(obj, p)
        return obj

    def run(self) -> "ChannelAnalysis":
        t0 = time.perf_counter()
        for node in self.gm.graph.nodes:
            try:
                v = self.visit(node)
            except Exception as e:  # noqa: BLE001 - an op we mis-modelled becomes a barrier, never a crash
                args = self.val(node.args) if node.op != "output" else None
                v = self.a.barrier(node, f"channel analysis failed on {ch.fn_name(node)}: {type(e).__name__}: {e}", args)
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
        size_ids = ch.size_ids([self.val(node.args), self.val(node.kwargs)])
        if not size_ids:
            return v
        ids = np.unique(np.concatenate(size_ids))
        first = self.val(node.args[0]) if node.args else None
        getitem = node.op == "call_function" and node.target is operator.getitem
        if getitem and isinstance(first, (tuple, list)):
            return v                       # an element keeps (or lacks) its own channel-count tag
        if isinstance(v, int) and not isinstance(v, bool):
            return SizeInt(int(v), ids)
        if isinstance(v, tuple) and all(isinstance(e, int) for e in v) and getitem:
            return v
        spec = spec_of(node, self.modules) if node.op != "call_module" else None
        if spec is not None and spec.moves and isinstance(first, TensorVal) and first.has_channels \
                and not ch.size_ids(first):
            self.a._size_uses.append((node, ids, first.ids))
        else:
            self.a._size_uses.append((node, ids, None))
        return v

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            shape = self.out_shape(node)
            if shape is None:
                return Unknown("non-tensor input")
            return ch.plain(shape)      # model inputs carry no removable channels
        if node.op == "get_attr":
            obj = self.attr(node.target)
            if isinstance(obj, torch.Tensor):
                return ParamVal(node.target, tuple(obj.shape))
            return obj
        if node.op == "output":
            self.a.freeze_value(self.val(node.args), "model output")
            return None
        args = self.val(node.args)
        kwargs = self.val(node.kwargs)
        if node.op not in ("call_module", "call_function", "call_method"):
            return self.a.barrier(node, f"unknown node kind {node.op}", args)
        spec = spec_of(node, self.modules)
        target = self.modules[node.target] if node.op == "call_module" else node.target
        if spec is not None and spec.channels is not None:
            return spec.channels(self, node, target, args, kwargs)
        if node.op == "call_module":
            return self.a.barrier(node, f"opaque module {type(target).__name__} at '{node.target}'", [args, kwargs])
        if not ch.has([args, kwargs], (TensorVal, ParamVal, Unknown)):
            try:
                return ch.python_call(node, args, kwargs)
            except Exception:  # noqa: BLE001
                return Unknown(f"result of {ch.fn_name(node)}")
        return ch.unknown_op(self, node, args, kwargs, "function" if node.op == "call_function" else "method")


def analyze_channels(gm: fx.GraphModule) -> ChannelAnalysis:
    """Channel classes, groups, readers, slots and barriers of a traced graph with shapes.

    Requires ``node.meta["tensor_meta"]`` (``graphsel.trace`` with example inputs provides it).
    """
    if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
        raise ValueError("channel analysis needs shapes: trace the model with example inputs "
                         "(graphsel.trace(model, example_inputs)) first")
    return _Analyzer(gm).run()
