"""InsertSelectiveConv (``insert_selective_conv``): put a :class:`SelectiveConv2d` on every
``BatchNorm2d → ReLU → [Dropout] → Conv2d`` chain.

Contract: **exact** (a fresh selective conv has every slot open, no copies and zero shifts, so it
computes the chain it replaced; dropout follows the module's train/eval flag).

Matches every spelling of the chain (module, functional, method and in-place ReLU/dropout) with
``graphsel.Pattern(nn.BatchNorm2d, RELU, Optional(DROPOUT), nn.Conv2d)``. A conv is skipped, with
a diagnostic naming it and the reason, when:

* its input is not such a chain (e.g. a stem conv reading the image, a conv after a pooling or
  a concat, an activation other than ReLU);
* it is grouped (``groups > 1``: depthwise and grouped convs have no shared input slots);
* **the BN is shared by two branches**: the BN output (or the ReLU/dropout output) feeds any other
  node, or the BN / conv module is called at several places. dealloc/realloc rewrite the BN
  entries and conv columns of individual slots, which would silently change the other branch,
  so such chains are left alone;
* the BN is a subclass with its own ``forward`` (e.g. a fused BN+activation) or a functional
  ``batch_norm`` (there is no module to hold);
* a functional dropout whose ``training`` flag is a traced value;
* ``include`` / ``exclude`` rule it out.

**Convs with bias** are accepted: the bias is not indexed by input channels, so it is kept as is
(dealloc's mean compensation adds to it). Options: ``K`` (re-allocation fan-in; default 3 for 1×1
convs, 0 for larger kernels), ``gamma`` (dealloc threshold in (0, 1), default 1e-3), ``n_max`` (cap on
the copies of one channel), ``include`` / ``exclude`` (module names or globs, module classes, or a predicate
``fn(path, conv) -> bool``: :class:`graphsel.pipeline.select.ModuleSelection`). A graph without the pattern is a reported no-op.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.operator_schemas import normalize_function

from graphsel.analysis.patterns import DROPOUT, RELU, Optional, Pattern, describe, first_input
from graphsel.ir.graph import call_count, delete_unused_modules, replace_module
from graphsel.ir.meta import graphsel_meta
from graphsel.pipeline.passbase import Contract, Diagnostic, Pass, PassResult
from graphsel.pipeline.registry import register_pass
from graphsel.pipeline.select import ModuleSelection

from .module import DEFAULT_GAMMA, SelectiveConv2d, check_options

PATTERN = Pattern(nn.BatchNorm2d, RELU, Optional(DROPOUT), nn.Conv2d, single_user=False,
                  name="BatchNorm2d → ReLU → [Dropout] → Conv2d")

_DROPOUT_MODULES = {F.dropout: nn.Dropout, torch.dropout: nn.Dropout, torch.dropout_: nn.Dropout,
                    F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d, F.dropout3d: nn.Dropout3d}

def _dropout_module(node: fx.Node, gm: fx.GraphModule) -> tuple[nn.Module | None, str | None, str | None]:
    """(module, origin path, problem) for the dropout node of a match."""
    if node.op == "call_module":
        return gm.get_submodule(node.target), node.target, None
    if node.op == "call_method":
        return None, None, f"dropout spelled as the method .{node.target}() is not supported"
    cls = _DROPOUT_MODULES.get(node.target)
    if cls is None:
        return None, None, f"unknown dropout function {getattr(node.target, '__name__', node.target)}"
    norm = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    kw = norm.kwargs if norm is not None else dict(node.kwargs)
    p = kw.get("p", 0.5)
    if isinstance(p, fx.Node):
        return None, None, "the dropout probability is a traced value"
    train = kw.get("training", kw.get("train", True))
    if isinstance(train, fx.Node):
        return None, None, "the dropout's training flag is a traced value"
    return cls(p=float(p), inplace=bool(kw.get("inplace", False))), None, None


def _users_problem(node: fx.Node, expected: fx.Node, what: str) -> str | None:
    others = [u for u in node.users if u is not expected]
    if not others:
        return None
    names = ", ".join(describe(u) for u in others)
    return (f"the {what} output also feeds {names}: a BatchNorm shared by two branches cannot become "
            f"part of one selective conv (dealloc/realloc rewrite its per-slot entries, which would "
            f"change the other branch)")


@register_pass
class InsertSelectiveConv(Pass):
    """Replace ``BatchNorm2d → ReLU → [Dropout] → Conv2d`` chains by SelectiveConv2d (contract: exact).
    See the module docstring for what is matched, skipped and why."""

    name = "insert_selective_conv"
    contract = Contract.EXACT

    def __init__(self, K: int | None = None, gamma: float = DEFAULT_GAMMA, n_max: int | None = None,
                 include: Any = None, exclude: Any = None):
        check_options(K, gamma, n_max)
        super().__init__(K=K, gamma=gamma, n_max=n_max, include=include, exclude=exclude)
        self.selection = ModuleSelection(include, exclude, owner=self.name)

    # -- matching ---------------------------------------------------------------------------
    def _check(self, m, gm: fx.GraphModule) -> str | None:
        bn_node, relu_node = m.nodes[0], m.nodes[1]
        conv_node = m.nodes[-1]
        drop_node = m.nodes[2] if len(m.nodes) == 4 else None
        conv = gm.get_submodule(conv_node.target)
        bn = gm.get_submodule(bn_node.target)
        if conv.groups != 1:
            return f"grouped convolution (groups={conv.groups}): its input slots are not shared by all filters"
        chain = [bn_node, relu_node] + ([drop_node] if drop_node is not None else []) + [conv_node]
        for node, nxt, what in zip(chain[:-1], chain[1:], ("BatchNorm", "ReLU", "dropout")):
            problem = _users_problem(node, nxt, what)
            if problem:
                return problem
        for node, what in ((bn_node, "BatchNorm"), (conv_node, "conv")):
            n = call_count(gm, node.target)
            if n != 1:
                return (f"the {what} module '{node.target}' is called at {n} places (shared weights); a "
                        f"selective conv would change every call")
        if type(bn).forward is not nn.modules.batchnorm._BatchNorm.forward:
            return (f"'{bn_node.target}' is a {type(bn).__name__} with its own forward; only plain "
                    f"BatchNorm2d semantics are supported")
        if len(bn_node.args) != 1 or bn_node.kwargs or len(conv_node.args) != 1 or conv_node.kwargs:
            return "the BatchNorm or conv call has extra arguments"
        return self.selection.why_not(conv_node.target, conv)

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        diags: list[Diagnostic] = []
        planned = []
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
                diags.append(Diagnostic("functional conv2d has no module to hold its state; use nn.Conv2d",
                                        node.name))
                continue
            if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.Conv2d):
                continue
            m = PATTERN.match(node, gm)
            if not m:
                diags.append(Diagnostic(f"skipped: {m.reason}", node.target))
                continue
            problem = self._check(m, gm)
            if problem is None and len(m.nodes) == 4:
                drop, drop_origin, problem = _dropout_module(m.nodes[2], gm)
            else:
                drop, drop_origin = None, None
            if problem:
                diags.append(Diagnostic(f"skipped: {problem}", node.target))
                continue
            planned.append((m, drop, drop_origin))

        inserted = []
        for m, drop, drop_origin in planned:
            bn_node, relu_node, conv_node = m.nodes[0], m.nodes[1], m.nodes[-1]
            drop_node = m.nodes[2] if len(m.nodes) == 4 else None
            path = conv_node.target
            origin = {"bn": bn_node.target, "conv": path}
            if relu_node.op == "call_module":
                origin["relu"] = relu_node.target
            if drop_origin:
                origin["dropout"] = drop_origin
            sconv = SelectiveConv2d(gm.get_submodule(bn_node.target), gm.get_submodule(path), drop,
                                    K=self.K, gamma=self.gamma, n_max=self.n_max, origin=origin)
            sconv.train(gm.get_submodule(path).training)
            if drop_node is not None and drop_node.op == "call_function":
                diags.append(Diagnostic(f"functional dropout at {drop_node.name} became {type(drop).__name__}"
                                        f"(p={drop.p}), which follows the module's train/eval flag", path, "info"))
            replace_module(gm, path, sconv)
            with gm.graph.inserting_before(conv_node):
                new = gm.graph.call_module(path, (first_input(bn_node),))
            new.meta.update(conv_node.meta)
            conv_node.replace_all_uses_with(new)
            for n in [conv_node, drop_node, relu_node, bn_node]:
                if n is not None:
                    gm.graph.erase_node(n)
            inserted.append(path)

        if inserted:
            gm.graph.lint()
            delete_unused_modules(gm)
            gm.recompile()
            state = graphsel_meta(gm).state.setdefault(self.name, {"layers": []})
            state["layers"].extend(inserted)
        else:
            diags.append(Diagnostic("no-op: no BatchNorm2d → ReLU → [Dropout] → Conv2d(groups=1) chain to "
                                    "make selective", level="info"))
        slots = sum(gm.get_submodule(p).in_channels for p in inserted)
        return PassResult(gm, modified=bool(inserted),
                          stats={"inserted": len(inserted), "skipped": sum(d.level == "skip" for d in diags),
                                 "slots": slots}, diagnostics=diags)
