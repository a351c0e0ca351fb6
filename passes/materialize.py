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
   per-channel module, a parameter dimension) is sliced to its kept positions, each module by its
   operator spec's ``slice`` rule (conv and linear weights and biases, norm parameters and
   running statistics, depthwise and grouped convolutions, any registered layer), parameters read
   with ``get_attr`` (layer-scale style) directly;
4. shape arguments are rewritten from the new shapes by each op's ``rewrite`` rule: view /
   reshape / expand sizes, split sizes (``chunk`` along channels becomes ``split``), channel slices
   and ``narrow`` bounds, ``index_select`` positions, ``layer_norm``'s normalized shape;
5. unused submodules are deleted and the masks cleared;
6. every node's recorded shape is resized along its channel dimension from the analysis
   (``PassResult.shapes_current``): the slim model is not run again to learn its shapes. Under
   verification the pipeline runs it anyway and checks these shapes against the real ones.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import TensorMetadata

from graphsel.analysis.channels import ChannelAnalysis, analyze_channels, segment_sums
from graphsel.analysis.masks import ChannelMasks, clear_masks
from graphsel.ir.graph import (add_module, attribute_of, call_count, delete_unused_modules, module_index, recompile,
                               replace_module)
from graphsel.ir.meta import graphsel_meta
from graphsel.ir.shapes import propagate_shapes, resized_meta
from graphsel.ir.tracing import example_inputs_of
from graphsel.ops.channel import TensorVal
from graphsel.ops.shape import CannotRewrite
from graphsel.ops.slicing import slice_tensor
from graphsel.ops.table import spec_of, spec_of_module
from graphsel.pipeline.passbase import Contract, Diagnostic, Pass, PassResult
from graphsel.pipeline.registry import register_pass

from .fold_masks import folded


class _Materializer:
    """The slicing state of one materialize run; the ``mx`` that ``OpSpec.rewrite`` rules receive."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.stats = {"gathers": 0, "zeroed_columns": 0, "modules_sliced": 0, "params_sliced": 0,
                      "shape_args_rewritten": 0}
        self.modules = module_index(gm)
        self.a: ChannelAnalysis | None = None        # the analysis and removed-class table slicing follows
        self.removed: np.ndarray | None = None
        self._kept: dict[int, int] = {}

    def follow(self, a: ChannelAnalysis, masks: ChannelMasks) -> None:
        """Slice by ``a`` from now on: the removed classes of ``masks`` as a lookup table, and the
        kept count of every channel tensor, counted in one lookup (materialize needs most)."""
        self.a, self.removed = a, self._removed_table(a, masks.removed)
        arrays = {id(t.ids): t.ids for _, _, t in a.channel_tensors() if len(t.ids)}
        self._kept = {}
        if arrays:
            lengths = np.fromiter((len(x) for x in arrays.values()), dtype=np.int64, count=len(arrays))
            counts = segment_sums(self.keep(np.concatenate(list(arrays.values()))), lengths)
            self._kept = dict(zip(arrays, counts.tolist()))

    # -- what rewrite rules use ---------------------------------------------------------------
    def keep(self, ids: np.ndarray) -> np.ndarray:
        """Keep flag per position of ``ids``."""
        return ~self.removed[self.a.class_of(ids)]

    def kept_count(self, ids: np.ndarray) -> int:
        hit = self._kept.get(id(ids))
        return int(self.keep(ids).sum()) if hit is None else hit

    def new_shape(self, v: TensorVal) -> tuple[int, ...]:
        shape = list(v.shape)
        if v.has_channels:
            shape[v.dim] = self.kept_count(v.ids)
        return tuple(shape)

    def set_arg(self, n: fx.Node, pos: int, key: str, value: Any) -> None:
        if len(n.args) > pos:
            args = list(n.args)
            args[pos] = value
            n.args = tuple(args)
        else:
            n.kwargs = {**n.kwargs, key: value}
        self.count_rewrite()

    def count_rewrite(self) -> None:
        self.stats["shape_args_rewritten"] += 1

    @staticmethod
    def _removed_table(a: ChannelAnalysis, removed: dict[str, set[int]]) -> np.ndarray:
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

    # -- step 2: consumer masks -----------------------------------------------------------
    def discharge_consumer_masks(self, a: ChannelAnalysis, masks: ChannelMasks) -> None:
        removed_ids = self._removed_table(a, masks.removed)
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
                survivors = ~whole & ~removed_ids[cls]
                if whole.any() and survivors.any() and len(nodes) == 1 and \
                        self._gather(node, m, a, np.flatnonzero(~whole)):
                    m = self.gm.get_submodule(mod)
                    partial = partial[np.flatnonzero(~whole)]
                else:
                    partial = masked
                if partial.any():
                    self._zero_columns(m, np.flatnonzero(partial))

    def _zero_columns(self, m: nn.Module, cols: np.ndarray) -> None:
        w = m.weight.detach().clone()
        w[:, torch.from_numpy(cols)] = 0
        m.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)    # copy-on-write
        self.stats["zeroed_columns"] += len(cols)

    def _is_chain_op(self, n: fx.Node) -> bool:
        """A per-channel op with one tensor input, exclusive to the path (modules called once)."""
        spec = spec_of(n, self.modules) if n.op in ("call_module", "call_function", "call_method") else None
        if spec is None or not spec.chain:
            return False
        if n.op == "call_module":
            return call_count(self.gm, n.target) == 1
        return len([a for a in n.args if isinstance(a, fx.Node)]) == 1

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
        with self.gm.graph.inserting_before(top):
            idx = self.gm.graph.get_attr(f"{idx_path}.index")
            g = self.gm.graph.call_function(torch.index_select, (cur, cdim, idx))
        top.replace_input_with(cur, g)
        keep_t = torch.from_numpy(keep)
        for n in chain:
            if n.op == "call_module":
                mod = self.gm.get_submodule(n.target)
                spec = spec_of_module(mod)
                if spec.slice is not None:
                    replace_module(self.gm, n.target, spec.slice(mod, {"chan": keep_t}))
        replace_module(self.gm, consumer.target, spec_of_module(m).slice(m, {"in": keep_t}))
        self.stats["gathers"] += 1
        return True

    # -- step 3: slots --------------------------------------------------------------------
    def slice_slots(self) -> None:
        a = self.a
        per_module: dict[str, dict[str, torch.Tensor]] = {}
        slots = list(a.slots.items())
        if not slots:
            return
        # every slot's keep flags in one lookup; only slots that lose a position are visited
        lengths = np.fromiter((len(slot.ids[0]) for _, slot in slots), dtype=np.int64, count=len(slots))
        keep_all = self.keep(np.concatenate([slot.ids[0] for _, slot in slots]))
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
            spec = spec_of_module(m)
            if spec is None or spec.slice is None:
                raise RuntimeError(f"module '{path}' ({type(m).__name__}) has per-channel slots but its operator "
                                   f"spec has no slice rule")
            replace_module(self.gm, path, spec.slice(m, parts), index)
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

    # -- step 4: shape arguments -----------------------------------------------------------
    def rewrite_shape_args(self) -> None:
        a = self.a
        for n in list(self.gm.graph.nodes):
            if n.op not in ("call_function", "call_method", "call_module"):
                continue
            x = a.values.get(n.args[0].name) if n.args and isinstance(n.args[0], fx.Node) else None
            if not (isinstance(x, TensorVal) and x.has_channels) or self.kept_count(x.ids) == len(x.ids):
                continue                                 # the input lost no channel
            spec = spec_of(n, self.modules)
            if spec is None or spec.rewrite is None:
                continue
            try:
                spec.rewrite(self, n, x, a.values.get(n.name))
            except CannotRewrite as e:
                raise RuntimeError(f"cannot rewrite the shape arguments of node {n.name}: {e}") from None

    # -- step 6: recorded shapes ------------------------------------------------------------
    def update_shapes(self) -> bool:
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
                new = self._resized(tm, self.a.values.get(n.name))
            if new is None:
                return False
            n.meta["tensor_meta"] = new
        return True

    def _resized(self, tm: Any, v: Any) -> Any:
        if isinstance(tm, TensorMetadata):
            if isinstance(v, TensorVal) and v.has_channels:
                return resized_meta(tm, self.new_shape(v))
            return tm if not isinstance(v, (tuple, list)) else None
        if isinstance(tm, (tuple, list)):
            if isinstance(v, (tuple, list)) and len(v) == len(tm):
                out = [self._resized(t, x) for t, x in zip(tm, v)]
                return None if any(o is None for o in out) else type(tm)(out)
            return tm if not isinstance(v, TensorVal) else None     # a barrier's tuple: frozen inputs
        return None


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

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        meta = graphsel_meta(gm)
        if not meta.masks:
            return PassResult(gm, False, {}, [Diagnostic("no channel masks: nothing to materialize", level="info")])
        a = ctx.analysis("channels", gm)
        masks, fold_stats = folded(gm, ctx)
        mat = _Materializer(gm)
        if masks.consumer:
            mat.discharge_consumer_masks(a, masks)     # (the code is generated once, at the end)
            if mat.stats["gathers"]:
                inputs = ctx.example_inputs if ctx.example_inputs is not None else example_inputs_of(gm)
                propagate_shapes(gm, inputs)         # the gathers changed shapes downstream of them
                a = analyze_channels(gm)
        mat.follow(a, masks)
        mat.rewrite_shape_args()
        mat.slice_slots()
        clear_masks(gm)
        delete_unused_modules(gm)
        recompile(gm)
        shapes_current = mat.update_shapes()
        stats = {**mat.stats, "classes_removed": fold_stats["classes_removed"]}
        return PassResult(gm, modified=True, stats=stats, shapes_current=shapes_current)
