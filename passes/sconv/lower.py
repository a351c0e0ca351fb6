"""LowerSelectiveConv (``lower_selective_conv``): replace every SelectiveConv2d by plain ops.

Contract: **exact** — the lowered graph computes what the selective convs computed (eval mode),
whatever their state (closed slots, copies, fractional or integer shifts).

For a selective conv at path ``P`` reading ``x`` (C channels) with ``S`` open copy slots
``r_1..r_S`` (``source ≥ 0``) the lowering emits::

    g  = torch.index_select(x, 1, <constant index: source[r_1..r_S]>)      # gather the copied channels
    g  = P_shift(g)        # depthwise Conv2d, replicate padding: the bilinear shifts (omitted if all 0)
    xc = torch.cat([x, g], 1)                                              # C + S channels
    h  = torch.relu(BN'(xc)); [h = dropout(h)]
    y  = P(h)              # Conv2d over C + S input channels

``BN'`` is the BN with the copy slots' entries appended; ``P`` (the original conv path) reads
channel ``c < C`` with the slot's weights when slot ``c`` is open and reads its own channel, and
channel ``C + s`` with the weights of slot ``r_s``. Every other column (closed slots, and slots
whose own channel was replaced by a copy) is **exactly zero**, and a **consumer mask** is recorded
for it (``graphsel.analysis.masks.add_consumer_mask(gm, P, removed)``), so the graph is exact before the
masks are folded; ``fold_masks`` / ``materialize`` then remove those BN entries, the gathers
and, when nothing else reads them, the producers' filters. Without copies the lowering is just
``BN → ReLU → [Dropout] → Conv`` with the zeroed columns and the mask. The BN (and a dropout
module) go back to their original paths when free.

Selective kernel expansion (merging a copy into its source slot as a larger kernel,
``conv(h_r; W_r) + conv(shift_b h_r; W_i) = conv(h_r; W_r + shift_{−b} W_i)``) is not done, because
the cost model and the border semantics never allow it for trained states: (1) the copy passes
through its own BN and ReLU, and ``ReLU(BN_i(shift_b x_r)) = shift_b(ReLU(BN_r x_r))`` holds only for
integer shifts with identical BN entries, which training does not keep; (2) the shift replicates
border pixels while the conv zero-pads, so even then the merge is exact only in the interior;
(3) copies live in 1×1 convs (K > 0 by default), where merging turns ``C + S`` MACs per output
pixel into ``C·(2r+1)²`` — never cheaper. Gather + shift is exact in every case.
"""
from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn

from graphsel.analysis.masks import add_consumer_mask
from graphsel.ir.graph import add_module, delete_unused_modules, replace_module, unique_module_path
from graphsel.pipeline.passbase import Contract, Diagnostic, Pass, PassResult
from graphsel.pipeline.registry import register_pass

from .module import SelectiveConv2d, selective_modules
from .shift import shift_kernels


def _free_path(gm: fx.GraphModule, preferred: str | None, fallback: str) -> str:
    """``preferred`` (the module's path before insertion) when free, else a fresh path near it."""
    return unique_module_path(gm, preferred or fallback)


def _expanded_bn(bn: nn.BatchNorm2d, extra: list[int], like: torch.Tensor) -> nn.BatchNorm2d:
    """``bn`` with the entries of channels ``extra`` appended (a copy slot gets its own BN entry)."""
    if not extra:
        return copy.deepcopy(bn)
    idx = torch.tensor(extra, dtype=torch.long, device=like.device)
    new = nn.BatchNorm2d(bn.num_features + len(extra), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            old = getattr(bn, name)
            if old is not None:
                getattr(new, name).copy_(torch.cat([old, old.index_select(0, idx.to(old.device))]))
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def _expanded_conv(conv: nn.Conv2d, own: list[int], copies: list[int]) -> nn.Conv2d:
    c = conv.in_channels
    w = conv.weight.detach()
    new_w = torch.zeros(w.shape[0], c + len(copies), *w.shape[2:], dtype=w.dtype, device=w.device)
    if own:
        i = torch.tensor(own, dtype=torch.long, device=w.device)
        new_w[:, i] = w[:, i]
    if copies:
        new_w[:, c:] = w[:, torch.tensor(copies, dtype=torch.long, device=w.device)]
    new = copy.deepcopy(conv)
    new.weight = nn.Parameter(new_w, requires_grad=conv.weight.requires_grad)
    new.in_channels = c + len(copies)
    return new


def _shift_conv(shift: torch.Tensor, dtype: torch.dtype, device) -> nn.Conv2d | None:
    if not bool((shift != 0).any()):
        return None
    kernels, (ry, rx) = shift_kernels(shift, dtype)
    s = shift.shape[0]
    conv = nn.Conv2d(s, s, kernel_size=tuple(kernels.shape[2:]), padding=(ry, rx), padding_mode="replicate",
                     groups=s, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(kernels)
    conv.weight.requires_grad_(False)
    return conv


def lower_node(gm: fx.GraphModule, node: fx.Node) -> dict[str, int]:
    """Lower the selective conv called by ``node`` (see the module docstring); returns counts."""
    path = node.target
    m: SelectiveConv2d = gm.get_submodule(path)
    x = node.args[0]
    c = m.in_channels
    is_open = (m.is_open > 0).tolist()
    source = m.source.tolist()
    own = [i for i in range(c) if is_open[i] and source[i] < 0]
    copies = [i for i in range(c) if is_open[i] and source[i] >= 0]
    removed = [i for i in range(c) if not (is_open[i] and source[i] < 0)]
    origin = m.origin

    bn = _expanded_bn(m.bn, copies, m.conv.weight)
    conv = _expanded_conv(m.conv, own, copies)
    graph = gm.graph
    shift_mod = None
    with graph.inserting_before(node):
        inp = x
        if copies:
            w = m.conv.weight
            index = torch.tensor([source[i] for i in copies], dtype=torch.long, device=w.device)
            buf = unique_module_path(gm, "sconv_index_" + path.replace(".", "_"))
            gm.register_buffer(buf, index)
            gathered = graph.call_function(torch.index_select, (x, 1, graph.get_attr(buf)))
            shift_mod = _shift_conv(m.shift.detach()[torch.tensor(copies)], w.dtype, w.device)
            if shift_mod is not None:
                shift_path = add_module(gm, path + "_shift", shift_mod)
                gathered = graph.call_module(shift_path, (gathered,))
            inp = graph.call_function(torch.cat, ([x, gathered], 1))
        bn_path = _free_path(gm, origin.get("bn"), path + "_bn")
        gm.add_submodule(bn_path, bn)
        h = graph.call_module(bn_path, (inp,))
        h = graph.call_function(torch.relu, (h,))
        if m.dropout is not None:
            drop_path = _free_path(gm, origin.get("dropout"), path + "_dropout")
            gm.add_submodule(drop_path, copy.deepcopy(m.dropout))
            h = graph.call_module(drop_path, (h,))
        y = graph.call_module(path, (h,))
    y.meta.update({k: v for k, v in node.meta.items() if k == "tensor_meta"})
    node.replace_all_uses_with(y)
    graph.erase_node(node)
    replace_module(gm, path, conv)
    if removed:
        add_consumer_mask(gm, path, removed)
    return {"copies": len(copies), "removed": len(removed), "shifted": int(shift_mod is not None)}


@register_pass
class LowerSelectiveConv(Pass):
    """Replace every SelectiveConv2d by gather + depthwise shift + BN → ReLU → [Dropout] → Conv2d, with
    consumer masks for the columns it no longer reads (contract: exact). See the module docstring."""

    name = "lower_selective_conv"
    contract = Contract.EXACT

    def __init__(self):
        super().__init__()

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        diags: list[Diagnostic] = []
        nodes = [n for n in gm.graph.nodes
                 if n.op == "call_module" and isinstance(gm.get_submodule(n.target), SelectiveConv2d)]
        counts = {"lowered": 0, "copies": 0, "removed": 0, "shift_convs": 0}
        called = {n.target for n in nodes}
        for target, k in Counter(n.target for n in nodes).items():
            if k > 1:
                raise ValueError(f"lower_selective_conv: '{target}' is called at {k} places; a SelectiveConv2d must "
                                 f"be called once (InsertSelectiveConv never creates shared ones)")
        for node in nodes:
            got = lower_node(gm, node)
            counts["lowered"] += 1
            counts["copies"] += got["copies"]
            counts["removed"] += got["removed"]
            counts["shift_convs"] += got["shifted"]
        if nodes:
            gm.graph.lint()
            delete_unused_modules(gm)
            gm.recompile()
        else:
            diags.append(Diagnostic("no-op: the graph has no SelectiveConv2d", level="info"))
        for p, _ in selective_modules(gm):
            if p not in called:
                diags.append(Diagnostic("a SelectiveConv2d inside an opaque module cannot be lowered", p, "warning"))
        return PassResult(gm, modified=bool(nodes), stats=counts, diagnostics=diags)
