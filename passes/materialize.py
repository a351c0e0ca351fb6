"""Materialize (``materialize``): turn channel masks into a physically smaller graph.

Contract: exact with respect to the masked model (the pipeline verifies the result against the
mask oracle of the input graph).

Steps:
1. liveness (:func:`graphsel.passes.fold_masks.fold`, reused when FoldMasks just ran on the same
   graph and masks): the classes to remove, and the consumer
   masks of channels other readers still need;
2. every consumer that stops reading whole channels gets a gather (``index_select``) on the path
   exclusive to it — walking up through single-user per-channel ops (BatchNorm, activations,
   dropout, ...) whose modules it slices — or, when no such path exists or it stops reading only
   part of a channel (a flatten block), zeroed weight columns;
3. the channel analysis is re-run and every *slot* (a module's input/output channels, a
   per-channel module, a parameter dimension) is sliced to its kept positions: conv and linear
   weights and biases, BatchNorm / LayerNorm / GroupNorm / InstanceNorm / PReLU parameters and
   running statistics, depthwise and grouped convolutions, layer-scale style parameters;
4. shape arguments are rewritten from the new shapes: view / reshape / expand sizes, split sizes
   (``chunk`` along channels becomes ``split``), channel slices and ``narrow`` bounds,
   ``index_select`` positions, ``layer_norm``'s normalized shape;
5. unused submodules are deleted and the masks cleared;
6. every node's recorded shape is resized along its channel dimension from the analysis
   (``PassResult.shapes_current``): the slim model is not run again to learn its shapes. Under
   verification the pipeline runs it anyway and checks these shapes against the real ones.
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import TensorMetadata

from graphsel import Contract, Diagnostic, Pass, PassResult, register_pass
from graphsel.analysis.channels import (ChannelAnalysis, TensorVal, analyze_channels, indexed_dims, segment_sums,
                               _ACT_MODULES, _UNARY_FUNCS, _UNARY_METHODS)
from graphsel.pipeline.context import graph_fingerprint
from graphsel.ir.graph import (add_module, attribute_of, call_count, delete_unused_modules, module_index, recompile,
                                  replace_module)
from graphsel.analysis.masks import ChannelMasks, clear_masks, resolve_masks
from graphsel.ir.meta import graphsel_meta
from graphsel.ir.shapes import propagate_shapes, resized_meta
from graphsel.ir.tracing import example_inputs_of
from graphsel.ops.slicing import slice_conv, slice_linear, slice_per_channel, slice_tensor

from .fold_masks import FOLDED_KEY, fold_once

_PER_CHANNEL_MODULES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _keep_mask(a: ChannelAnalysis, ids: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Keep flag per position; ``removed`` is a :meth:`ChannelAnalysis.class_lookup` table."""
    return ~removed[a.class_of(ids)]


class _Materializer:
    def __init__(self, gm: fx.GraphModule, diags: list[Diagnostic]):
        self.gm = gm
        self.diags = diags
        self.stats = {"gathers": 0, "zeroed_columns": 0, "modules_sliced": 0, "params_sliced": 0,
                      "shape_args_rewritten": 0}
        self._kept_key: tuple | None = None            # see _kept_count
        self._kept_memo: dict[int, int] = {}

    # -- step 2: consumer masks -----------------------------------------------------------
    def discharge_consumer_masks(self, a: ChannelAnalysis, masks: ChannelMasks) -> None:
        removed = masks.removed
        removed_ids = self._removed_ids(a, removed)
        for mod, positions in masks.consumer.items():
            nodes = [n for n in self.gm.graph.nodes if n.op == "call_module" and n.target == mod]
            for node in nodes:
                reader = next((r for r in a.readers if r.node == node.name), None)
                if reader is None:
                    continue
                n_in = len(reader.ids)
                masked = np.zeros(n_in, dtype=bool)
                masked[[p for p in positions if p < n_in]] = True
                cls = a.class_of(reader.ids)
                masked &= ~removed_ids[cls]                  # removed globally anyway
                if not masked.any():
                    continue
                # whole classes this consumer no longer reads
                whole = masked.copy()
                for c in np.unique(cls[masked]):
                    if c >= 0 and not masked[cls == c].all():
                        whole[cls == c] = False
                partial = masked & ~whole
                m = self.gm.get_submodule(mod)
                globally_removed = removed_ids[cls]
                survivors = ~whole & ~globally_removed
                if whole.any() and survivors.any() and len(nodes) == 1 and \
                        self._gather(node, m, a, np.flatnonzero(~whole)):
                    m = self.gm.get_submodule(mod)
                    keep_idx = np.flatnonzero(~whole)
                    partial = partial[keep_idx]
                else:
                    partial = masked
                if partial.any():
                    self._zero_columns(m, np.flatnonzero(partial))

    def _removed_ids(self, a: ChannelAnalysis, removed: dict[str, set[int]]) -> np.ndarray:
        """The removed classes as a :meth:`ChannelAnalysis.class_lookup` table."""
        by_module = {}
        for name, path in a.source_module.items():
            by_module.setdefault(path, name)
        cls = []
        for src, pos in removed.items():
            name = by_module.get(src, src)
            if name in a.sources and pos:
                start, _ = a.sources[name]
                cls.extend(a.labels[start + np.fromiter(sorted(pos), dtype=np.int64)].tolist())
        return a.class_lookup(np.asarray(sorted(set(cls)), dtype=np.int64))

    def _zero_columns(self, m: nn.Module, cols: np.ndarray) -> None:
        w = m.weight.detach().clone()
        w[:, torch.from_numpy(cols)] = 0
        m.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)    # copy-on-write
        self.stats["zeroed_columns"] += len(cols)

    def _is_chain_op(self, n: fx.Node) -> bool:
        if n.op == "call_module":
            m = self.gm.get_submodule(n.target)
            return isinstance(m, _PER_CHANNEL_MODULES + _ACT_MODULES) and call_count(self.gm, n.target) == 1
        if n.op == "call_function":
            return n.target in _UNARY_FUNCS and len([a for a in n.args if isinstance(a, fx.Node)]) == 1
        if n.op == "call_method":
            return n.target in _UNARY_METHODS and len([a for a in n.args if isinstance(a, fx.Node)]) == 1
        return False

    def _gather(self, consumer: fx.Node, m: nn.Module, a: ChannelAnalysis, keep: np.ndarray) -> bool:
        """Insert ``index_select`` on the path exclusive to ``consumer``; slice what lies between."""
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups != 1:
            return False
        dim_of = lambda n: a.values[n.name].dim if isinstance(a.values.get(n.name), TensorVal) else None
        x = consumer.args[0]
        if not isinstance(x, fx.Node) or dim_of(x) is None:
            return False
        cdim = dim_of(x)
        chain: list[fx.Node] = []
        top = consumer
        cur = x
        while self._is_chain_op(cur) and len(cur.users) == 1 and isinstance(cur.args[0], fx.Node) \
                and dim_of(cur.args[0]) == cdim and a.values[cur.args[0].name].shape[cdim] == a.values[cur.name].shape[cdim]:
            chain.append(cur)
            top = cur
            cur = cur.args[0]
        # `cur` feeds `top`: insert the gather on that edge
        idx_path = add_module(self.gm, "graphsel_gather", _IndexHolder(torch.from_numpy(keep)))
        with self.gm.graph.inserting_before(top if top is not consumer else consumer):
            idx = self.gm.graph.get_attr(f"{idx_path}.index")
            g = self.gm.graph.call_function(torch.index_select, (cur, cdim, idx))
        (top if top is not consumer else consumer).replace_input_with(cur, g)
        keep_t = torch.from_numpy(keep)
        for n in chain:
            if n.op == "call_module":
                mod = self.gm.get_submodule(n.target)
                if isinstance(mod, _PER_CHANNEL_MODULES):
                    replace_module(self.gm, n.target, slice_per_channel(mod, keep_t))
        if isinstance(m, nn.Linear):
            replace_module(self.gm, consumer.target, slice_linear(m, keep_in=keep_t))
        else:
            replace_module(self.gm, consumer.target, slice_conv(m, keep_in=keep_t))
        self.stats["gathers"] += 1
        return True

    # -- step 3: slots --------------------------------------------------------------------
    def slice_slots(self, a: ChannelAnalysis, removed: np.ndarray) -> None:
        per_module: dict[str, dict[str, torch.Tensor]] = {}
        slots = list(a.slots.items())
        if not slots:
            return
        # every slot's keep flags in one lookup; only slots that lose a position are visited
        lengths = np.fromiter((len(slot.ids[0]) for _, slot in slots), dtype=np.int64, count=len(slots))
        keep_all = _keep_mask(a, np.concatenate([slot.ids[0] for _, slot in slots]), removed)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        for i in np.flatnonzero(segment_sums(~keep_all, lengths)):
            key, slot = slots[i]
            idx = torch.from_numpy(np.flatnonzero(keep_all[starts[i]:ends[i]]))
            if key[0] == "module":
                per_module.setdefault(key[1], {})[key[2]] = idx
            elif key[0] == "param":
                self._slice_param(key[1], key[2], idx)
        index = module_index(self.gm)
        for path, parts in per_module.items():
            m = index[path] if path in index else self.gm.get_submodule(path)
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                if "chan" in parts:
                    new = slice_per_channel(m, parts["chan"])
                else:
                    new = slice_conv(m, parts.get("out"), parts.get("in"))
            elif isinstance(m, nn.Linear):
                new = slice_linear(m, parts.get("out"), parts.get("in"))
            else:
                new = slice_per_channel(m, parts["chan"])
            replace_module(self.gm, path, new, index)
            self.stats["modules_sliced"] += 1

    def _slice_param(self, target: str, dim: int, idx: torch.Tensor) -> None:
        owner_path, _, name = target.rpartition(".")
        owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
        t = getattr(owner, name)
        new = slice_tensor(t, dim, idx)
        if isinstance(t, nn.Parameter):
            setattr(owner, name, new)
        elif name in owner._buffers:
            owner._buffers[name] = new
        else:
            setattr(owner, name, new)
        self.stats["params_sliced"] += 1

    # -- step 6: recorded shapes ------------------------------------------------------------
    def update_shapes(self, a: ChannelAnalysis, removed: np.ndarray) -> bool:
        """Resize every node's recorded ``tensor_meta`` along its channel dimension (``get_attr``
        nodes: read from the sliced tensor) instead of running the slim model again. Nodes without
        channels keep their shapes: the channel analysis freezes every channel whose removal could
        reach them. False when some layout cannot be derived (the pipeline then propagates)."""
        for n in self.gm.graph.nodes:
            tm = n.meta.get("tensor_meta")
            if tm is None:
                continue
            if n.op == "get_attr":
                t = attribute_of(self.gm, n.target)
                if not isinstance(t, torch.Tensor):
                    return False
                new = resized_meta(tm, tuple(t.shape)) if isinstance(tm, TensorMetadata) else None
            else:
                new = self._resized(tm, a.values.get(n.name), a, removed)
            if new is None:
                return False
            n.meta["tensor_meta"] = new
        return True

    def _resized(self, tm: Any, v: Any, a: ChannelAnalysis, removed: np.ndarray) -> Any:
        if isinstance(tm, TensorMetadata):
            if isinstance(v, TensorVal) and v.has_channels:
                return resized_meta(tm, self._new_shape(v, a, removed))
            return tm if not isinstance(v, (tuple, list)) else None
        if isinstance(tm, (tuple, list)):
            if isinstance(v, (tuple, list)) and len(v) == len(tm):
                out = [self._resized(t, x, a, removed) for t, x in zip(tm, v)]
                return None if any(o is None for o in out) else type(tm)(out)
            return tm if not isinstance(v, TensorVal) else None     # a barrier's tuple: frozen inputs
        return None

    # -- step 4: shape arguments -----------------------------------------------------------
    def rewrite_shape_args(self, a: ChannelAnalysis, removed: np.ndarray) -> None:
        for n in list(self.gm.graph.nodes):
            if n.op not in ("call_function", "call_method", "call_module"):
                continue
            out = a.values.get(n.name)
            x = a.values.get(n.args[0].name) if n.args and isinstance(n.args[0], fx.Node) else None
            try:
                self._rewrite(n, x, out, a, removed)
            except _CannotRewrite as e:
                raise RuntimeError(f"cannot rewrite the shape arguments of node {n.name}: {e}") from None

    def _kept_count(self, a: ChannelAnalysis, ids: np.ndarray, removed: np.ndarray) -> int:
        """How many of the positions ``ids`` are kept. Counted for every channel tensor of ``a`` in
        one lookup the first time (materialize asks for most of them), then read back."""
        key = (id(a), id(removed))
        if self._kept_key != key:
            arrays = {id(t.ids): t.ids for _, _, t in a.channel_tensors() if len(t.ids)}
            self._kept_key, self._kept_memo = key, {}
            if arrays:
                lengths = np.fromiter((len(x) for x in arrays.values()), dtype=np.int64, count=len(arrays))
                counts = segment_sums(_keep_mask(a, np.concatenate(list(arrays.values())), removed), lengths)
                self._kept_memo = dict(zip(arrays, counts.tolist()))
        hit = self._kept_memo.get(id(ids))
        return int(_keep_mask(a, ids, removed).sum()) if hit is None else hit

    def _new_shape(self, v: TensorVal, a, removed) -> tuple[int, ...]:
        shape = list(v.shape)
        if v.has_channels:
            shape[v.dim] = self._kept_count(a, v.ids, removed)
        return tuple(shape)

    def _rewrite(self, n: fx.Node, x: Any, out: Any, a, removed) -> None:
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        xv = x if isinstance(x, TensorVal) and x.has_channels else None
        changed_in = xv is not None and self._kept_count(a, xv.ids, removed) < len(xv.ids)
        if n.op == "call_module":
            m = self.gm.get_submodule(n.target) if changed_in and isinstance(out, TensorVal) else None
            if isinstance(m, nn.Unflatten):
                new_shape = self._new_shape(out, a, removed)
                sizes = new_shape[m.dim if m.dim >= 0 else len(xv.shape) + m.dim:][:len(m.unflattened_size)]
                m.unflattened_size = tuple(sizes)
            return
        if not changed_in:
            return
        if name in ("view", "reshape", "expand", "broadcast_to") and isinstance(out, TensorVal):
            self._rewrite_sizes(n, self._new_shape(out, a, removed), out)
        elif name in ("split", "chunk", "tensor_split") and isinstance(out, tuple):
            self._rewrite_split(n, xv, a, removed)
        elif name == "getitem" and n.target is operator.getitem:
            self._rewrite_getitem(n, xv, a, removed)
        elif name == "narrow":
            self._rewrite_narrow(n, xv, a, removed)
        elif name == "index_select":
            self._rewrite_index_select(n, xv, out, a, removed)
        elif name == "unflatten" and isinstance(out, TensorVal):
            dim = n.args[1] if len(n.args) > 1 else n.kwargs["dim"]
            dim = dim if dim >= 0 else len(xv.shape) + dim
            new_shape = self._new_shape(out, a, removed)
            k = len(n.args[2]) if len(n.args) > 2 else len(n.kwargs["sizes"])
            self._set_arg(n, 2, "sizes", tuple(new_shape[dim:dim + k]))
        elif n.target is F.layer_norm:
            nd = len(n.args[1]) if len(n.args) > 1 else len(n.kwargs["normalized_shape"])
            if xv.dim >= len(xv.shape) - nd:
                self._set_arg(n, 1, "normalized_shape", tuple(self._new_shape(xv, a, removed)[-nd:]))
        elif name in ("repeat",) and isinstance(out, TensorVal):
            pass
        elif n.target in (torch.reshape,) and isinstance(out, TensorVal):
            self._set_arg(n, 1, "shape", self._merge_sizes(n.args[1], self._new_shape(out, a, removed), out))

    def _set_arg(self, n: fx.Node, pos: int, key: str, value: Any) -> None:
        if len(n.args) > pos:
            args = list(n.args)
            args[pos] = value
            n.args = tuple(args)
        else:
            kw = dict(n.kwargs)
            kw[key] = value
            n.kwargs = kw
        self.stats["shape_args_rewritten"] += 1

    def _merge_sizes(self, old: Any, new_shape: tuple[int, ...], out: TensorVal) -> tuple:
        old = list(old)
        if len(old) != len(new_shape):
            raise _CannotRewrite(f"size list {old} does not match the output rank {len(new_shape)}")
        merged = []
        for i, (o, s) in enumerate(zip(old, new_shape)):
            if isinstance(o, int) and o != -1 and o != s:
                merged.append(s)
            else:       # -1, or a size computed at run time (the analysis checked it follows the channels)
                merged.append(o)
        return tuple(merged)

    def _rewrite_sizes(self, n: fx.Node, new_shape: tuple[int, ...], out: TensorVal) -> None:
        if n.op == "call_method":
            sizes = n.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)):
                n.args = (n.args[0], self._merge_sizes(sizes[0], new_shape, out))
            elif "size" in n.kwargs or "shape" in n.kwargs:
                key = "size" if "size" in n.kwargs else "shape"
                kw = dict(n.kwargs)
                kw[key] = self._merge_sizes(kw[key], new_shape, out)
                n.kwargs = kw
            else:
                n.args = (n.args[0],) + self._merge_sizes(sizes, new_shape, out)
        else:
            self._set_arg(n, 1, "size", self._merge_sizes(n.args[1], new_shape, out))
            return
        self.stats["shape_args_rewritten"] += 1

    def _kept_counts(self, keep: np.ndarray, sizes: list[int]) -> list[int]:
        out, start = [], 0
        for s in sizes:
            out.append(int(keep[start:start + s].sum()))
            start += s
        return out

    def _rewrite_split(self, n: fx.Node, xv: TensorVal, a, removed) -> None:
        name = n.target if n.op == "call_method" else n.target.__name__
        args = list(n.args)
        kwargs = dict(n.kwargs)
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
        dim = dim if dim >= 0 else len(xv.shape) + dim
        if dim != xv.dim:
            return
        c = xv.shape[dim]
        keep = _keep_mask(a, xv.ids, removed)
        if name == "chunk":
            chunks = kwargs.get("chunks", args[1])
            per = -(-c // chunks)
            sizes = [min(per, c - i * per) for i in range(chunks) if c - i * per > 0]
        elif name == "split":
            spec = kwargs.get("split_size_or_sections", kwargs.get("split_size", args[1]))
            sizes = list(spec) if isinstance(spec, (list, tuple)) else [min(spec, c - i) for i in range(0, c, spec)]
        else:
            raise _CannotRewrite("tensor_split along channels")
        new_sizes = self._kept_counts(keep, sizes)
        if any(s == 0 for s in new_sizes):
            raise _CannotRewrite(f"a split piece loses all its channels ({sizes} -> {new_sizes})")
        if n.op == "call_method":
            n.target = "split"
            n.args = (args[0], new_sizes)
            n.kwargs = {"dim": dim}
        else:
            n.target = torch.split
            n.args = (args[0], new_sizes)
            n.kwargs = {"dim": dim}
        self.stats["shape_args_rewritten"] += 1

    def _rewrite_getitem(self, n: fx.Node, xv: TensorVal, a, removed) -> None:
        idx = n.args[1]
        items = list(idx) if isinstance(idx, tuple) else [idx]
        keep = _keep_mask(a, xv.ids, removed)
        for k, dim, it in indexed_dims(items, len(xv.shape)):
            if dim == xv.dim and isinstance(it, slice):
                start, stop, _ = it.indices(xv.shape[dim])
                new_start = int(keep[:start].sum())
                new_stop = new_start + int(keep[start:stop].sum())
                items[k] = slice(new_start if it.start is not None else None,
                                 new_stop if it.stop is not None else None, None)
                n.args = (n.args[0], tuple(items) if isinstance(idx, tuple) else items[0])
                self.stats["shape_args_rewritten"] += 1
                return

    def _rewrite_narrow(self, n: fx.Node, xv: TensorVal, a, removed) -> None:
        args = list(n.args)
        off = 1 if n.op == "call_method" or n.target is torch.narrow else 0
        dim, start, length = args[off], args[off + 1], args[off + 2]
        dim = dim if dim >= 0 else len(xv.shape) + dim
        if dim != xv.dim:
            return
        keep = _keep_mask(a, xv.ids, removed)
        args[off + 1] = int(keep[:start].sum())
        args[off + 2] = int(keep[start:start + length].sum())
        n.args = tuple(args)
        self.stats["shape_args_rewritten"] += 1

    def _rewrite_index_select(self, n: fx.Node, xv: TensorVal, out: TensorVal, a, removed) -> None:
        args = list(n.args)
        dim, idx_node = args[1], args[2]
        dim = dim if dim >= 0 else len(xv.shape) + dim
        if dim != xv.dim or not (isinstance(idx_node, fx.Node) and idx_node.op == "get_attr"):
            raise _CannotRewrite("index_select with a computed index along channels")
        keep_in = _keep_mask(a, xv.ids, removed)
        rank = np.cumsum(keep_in) - 1
        owner_path, _, attr = idx_node.target.rpartition(".")
        owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
        old = getattr(owner, attr)
        keep_out = _keep_mask(a, out.ids, removed)
        new = torch.from_numpy(rank[old.cpu().numpy()[keep_out]]).to(old)
        if attr in owner._buffers:
            owner._buffers[attr] = new
        else:
            setattr(owner, attr, new)
        self.stats["shape_args_rewritten"] += 1


class _CannotRewrite(Exception):
    pass


class _IndexHolder(nn.Module):
    """Holds the positions of a gather inserted by Materialize (a buffer, so it moves with .to())."""

    def __init__(self, index: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index.to(torch.long))


@register_pass
class Materialize(Pass):
    """Slice the graph to its kept channels (contract: exact w.r.t. the masked model). See module docstring."""

    name = "materialize"
    contract = Contract.EXACT

    def __init__(self):
        super().__init__()

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        meta = graphsel_meta(gm)
        diags: list[Diagnostic] = []
        if not meta.masks:
            return PassResult(gm, False, {}, [Diagnostic("no channel masks: nothing to materialize", level="info")])
        fingerprint = graph_fingerprint(gm)
        a = ctx.analysis("channels", gm, fingerprint=fingerprint)
        masks, fold_stats = fold_once(gm, a, fingerprint=fingerprint)
        mat = _Materializer(gm, diags)
        if masks.consumer:
            mat.discharge_consumer_masks(a, masks)     # (the code is generated once, at the end)
            if mat.stats["gathers"]:
                inputs = ctx.example_inputs if ctx.example_inputs is not None else example_inputs_of(gm)
                propagate_shapes(gm, inputs)         # the gathers changed shapes downstream of them
                a2 = analyze_channels(gm)
            else:
                a2 = a
        else:
            a2 = a
        removed_ids = mat._removed_ids(a2, masks.removed)
        # re-check (sources unchanged, so this cannot newly fail; it validates the mapping)
        mat.rewrite_shape_args(a2, removed_ids)
        mat.slice_slots(a2, removed_ids)
        clear_masks(gm)
        gm.meta.pop(FOLDED_KEY, None)
        delete_unused_modules(gm)
        recompile(gm)
        shapes_current = mat.update_shapes(a2, removed_ids)
        stats = {**mat.stats, "classes_removed": fold_stats["classes_removed"]}
        return PassResult(gm, modified=True, stats=stats, diagnostics=diags, shapes_current=shapes_current)
