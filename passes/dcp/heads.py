"""Auxiliary classifiers as side outputs of the graph (DCP's additional losses L_S^p).

``dcp_heads`` (:class:`InsertAuxiliaryHeads`) places P classifiers ``BatchNorm → ReLU → global
average pool → Linear`` after the pivot blocks (:mod:`.pivots`). Each is a chain of graph nodes
that reads the pivot's value and feeds nothing: the model's output is computed by exactly the same
nodes as before (contract **exact**, bit for bit), the channel analysis sees the heads as ordinary
readers of the pivot's channels, and ``dcp_remove_heads`` (:class:`RemoveAuxiliaryHeads`) or the
``dcp`` pass deletes them again. A channels-last pivot is moved to channels-first for its head.

:func:`aux_model` gives a GraphModule sharing every module with the graph whose forward returns
``(main output, (aux logits 1, ..., aux logits P))`` — what phase 1 trains. The heads are recorded
in ``graphsel_meta(gm).state["dcp"]["heads"]`` (pivot node, block, module paths, logits node).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from graphsel.analysis.channels import ChannelAnalysis
from graphsel.ir.graph import delete_unused_modules, module_index, recompile, unique_module_path
from graphsel.ir.meta import graphsel_meta
from graphsel.ir.shapes import tensor_shape
from graphsel.ops.channel import TensorVal
from graphsel.pipeline.passbase import Contract, Diagnostic, Pass, PassResult
from graphsel.pipeline.registry import register_pass

from .errors import DCPError
from .pivots import Structure, check_heads, find_structure

STATE_KEY = "dcp"
HEAD_ROOT = "dcp_heads"
_BATCHNORMS = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def dcp_state(gm: fx.GraphModule) -> dict[str, Any]:
    """``graphsel_meta(gm).state["dcp"]`` (created empty)."""
    return graphsel_meta(gm).state.setdefault(STATE_KEY, {})


def heads_of(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """The auxiliary classifiers recorded on ``gm`` whose nodes are still in its graph."""
    names = {n.name for n in gm.graph.nodes}
    return [h for h in dcp_state(gm).get("heads", []) if h["logits"] in names]


def num_classes_of(gm: fx.GraphModule, owner: str) -> int:
    """Classes of the model's output, which must be one N × K tensor of logits."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    arg = out.args[0]
    shape = tensor_shape(arg) if isinstance(arg, fx.Node) else None
    if shape is None or len(shape) != 2 or shape[1] < 2:
        what = f"shape {tuple(shape)}" if shape is not None else "not one tensor"
        raise DCPError(f"{owner}: DCP needs a classifier: the model must return one N × K tensor of class logits "
                       f"(its output is {what}). Wrap the model so that forward returns the logits.")
    return int(shape[1])


def insert_heads(gm: fx.GraphModule, a: ChannelAnalysis, structure: Structure, pivots: list[int],
                 num_classes: int) -> tuple[list[dict[str, Any]], list[Diagnostic]]:
    """Insert one head after each pivot block (see the module docstring); returns their records
    (also stored in the graph's DCP state) and diagnostics for pivots that got none."""
    nodes = {n.name: n for n in gm.graph.nodes}
    param = next(iter(gm.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    records, diags = [], []
    index = len(dcp_state(gm).get("heads", []))
    for b in pivots:
        block = structure.blocks[b]
        pivot = nodes[block.output]
        v = a.values.get(pivot.name)
        shape = tensor_shape(pivot)
        if not (isinstance(v, TensorVal) and v.has_channels and shape is not None and len(shape) in _BATCHNORMS):
            diags.append(Diagnostic("no auxiliary classifier: the block output is not an N×C×… feature map",
                                    block.output, "skip"))
            continue
        dtype = pivot.meta["tensor_meta"].dtype
        rank, cdim, c = len(shape), v.dim, shape[v.dim]
        base = unique_module_path(gm, f"{HEAD_ROOT}.h{index}")
        bn = _BATCHNORMS[rank](c).to(device=device, dtype=dtype)
        fc = nn.Linear(c, num_classes).to(device=device, dtype=dtype)
        gm.add_submodule(f"{base}.bn", bn)
        gm.add_submodule(f"{base}.fc", fc)
        g = gm.graph
        made: list[fx.Node] = []
        last = pivot

        def add(op: str, target, args) -> fx.Node:
            nonlocal last
            with g.inserting_after(last):
                n = g.create_node(op, target, args, name=f"dcp_h{index}_{len(made)}")
            made.append(n)
            last = n
            return n

        x = pivot
        if cdim != 1:
            x = add("call_function", torch.movedim, (x, cdim, 1))
        x = add("call_module", f"{base}.bn", (x,))
        x = add("call_function", torch.relu, (x,))
        x = add("call_function", torch.mean, (x, tuple(range(2, rank))))
        x = add("call_module", f"{base}.fc", (x,))
        records.append({"index": index, "block": b, "pivot": pivot.name, "bn": f"{base}.bn", "fc": f"{base}.fc",
                        "nodes": [n.name for n in made], "logits": x.name, "channels": c,
                        "channel_dim": cdim})
        index += 1
    if records:
        gm.graph.lint()
        recompile(gm)
    state = dcp_state(gm)
    state["heads"] = heads_of(gm) + records
    state["num_classes"] = num_classes
    return records, diags


def remove_heads(gm: fx.GraphModule) -> int:
    """Delete the auxiliary classifiers' nodes and modules; returns how many there were."""
    heads = heads_of(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    for h in heads:
        for name in reversed(h["nodes"]):
            n = nodes[name]
            if n.users:
                raise DCPError(f"auxiliary classifier node '{name}' is used by {list(n.users)[0].name}; the heads "
                               f"must stay side outputs")
            gm.graph.erase_node(n)
    dcp_state(gm)["heads"] = []
    if heads:
        delete_unused_modules(gm)
        gm.graph.lint()
        recompile(gm)
    return len(heads)


def aux_model(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over ``gm``'s graph and modules (shared: training it trains ``gm``) whose
    forward returns ``(main output, (aux logits, ...))``."""
    heads = heads_of(gm)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = None
    for n in gm.graph.nodes:
        if n.op == "output":
            out = n
            continue
        env[n] = g.node_copy(n, lambda x: env[x])
    main = fx.node.map_arg(out.args[0], lambda x: env[x])
    g.output((main, tuple(env[next(n for n in gm.graph.nodes if n.name == h["logits"])] for h in heads)))
    return fx.GraphModule(gm, g)


def own_heads(gm: fx.GraphModule) -> None:
    """Replace the heads' modules by copies (before training them inside a pass: the pipeline
    shares tensors with the previous graph)."""
    index = module_index(gm)
    for h in heads_of(gm):
        for key in ("bn", "fc"):
            parent, _, name = h[key].rpartition(".")
            setattr(index[parent], name, copy.deepcopy(index[h[key]]))


@register_pass
class InsertAuxiliaryHeads(Pass):
    """Insert DCP's auxiliary classifiers as side outputs (``dcp_heads``; contract: **exact** — the
    main output is computed by the same nodes). See the module docstring.

    Options: ``heads`` (an int, or ``"auto"``: one per ten weight layers, at most blocks − 1),
    ``num_classes`` (default: the model's output width). A graph that already has heads keeps them
    and gets none added (info). No residual blocks: :class:`DCPError`.
    """

    name = "dcp_heads"
    contract = Contract.EXACT

    def __init__(self, heads: int | str = "auto", num_classes: int | None = None):
        check_heads(heads, "dcp_heads")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 2):
            raise DCPError(f"dcp_heads: num_classes must be an int ≥ 2, got {num_classes!r}")
        super().__init__(heads=heads, num_classes=num_classes)

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        if heads_of(gm):
            return PassResult(gm, False, {"heads": len(heads_of(gm))},
                              [Diagnostic("the graph already has auxiliary classifiers; none added", level="info")])
        a = ctx.analysis("channels", gm)
        structure = find_structure(gm, a)
        if not structure.blocks:
            raise DCPError(f"dcp_heads: {structure.no_blocks_reason()}, so there is nowhere to place auxiliary "
                           f"classifiers. DCP's heads need a residual network; prune other models with "
                           f"('prune', {{...}}).")
        k = self.num_classes or num_classes_of(gm, "dcp_heads")
        pivots = structure.pivots(self.heads)
        records, diags = insert_heads(gm, a, structure, pivots, k)
        if not records:
            diags.append(Diagnostic(f"no auxiliary classifier inserted ({len(structure.blocks)} residual block(s): "
                                    f"a pivot must precede the last block)", level="info"))
        return PassResult(gm, bool(records), {"heads": len(records), "blocks": len(structure.blocks),
                                              "stages": structure.stages, "depth": structure.depth}, diags)


@register_pass
class RemoveAuxiliaryHeads(Pass):
    """Delete DCP's auxiliary classifiers (``dcp_remove_heads``; contract: **exact**)."""

    name = "dcp_remove_heads"
    contract = Contract.EXACT

    def __init__(self):
        super().__init__()

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        n = remove_heads(gm)
        diags = [] if n else [Diagnostic("no auxiliary classifiers to remove", level="info")]
        return PassResult(gm, n > 0, {"heads_removed": n}, diags)
