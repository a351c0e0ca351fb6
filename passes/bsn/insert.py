"""BudgetGates (``budget_gates``): put a :class:`~.gate.Gate` on every edge of a super network.

Contract: **exact** (a fresh gate has ``logit = init > 0``, so it is on in eval and passes its
edge through unchanged).

``on`` says which edges:

* ``"residual"`` (default): every residual branch, ``y = s + F(x)`` becomes ``y = s + h·F(x)``.
  Residual adds and which operand is the branch come from the graph and its channel analysis
  (:func:`.edges.residual_branches`), not from module names, so any spelling (``+``, ``+=``,
  ``torch.add``, ``.add``), identity and projection shortcuts, and drop-path or layer-scale
  inside the branch are found;
* ``"blocks"``: every composite module that is one summed edge of a fabric (an element of a
  container whose output is added to other edges, and not a cut of the graph,
  :func:`.edges.block_candidates`): ``y = h·B(x)``;
* module paths: a name, a glob, a module class or a predicate, or a list of them
  (:class:`graphsel.pipeline.select.ModuleSelection` rules): each selected module's output is
  gated, ``y = h·M(x)``. A module whose output is not single, or that is never called, is an
  error when named exactly and a reported skip when matched by a glob, class or predicate.

``include`` / ``exclude`` narrow the edges (matched on the branch's module — the innermost
module holding the whole residual function — or on the block's path). A graph without such an
edge is a reported no-op (0 gates). ``init`` is the initial logit (3: σ ≈ 0.95, the paper's).
After inserting, every gate of the graph is wired (:meth:`.edges.GateGraph.wire`) so that an
edge cut off from the inputs by gates that are off is exactly zero.
"""
from __future__ import annotations

import math
from typing import Any

import torch.fx as fx
import torch.nn as nn

from graphsel.errors import GraphselError
from graphsel.ir.graph import add_module, module_index
from graphsel.ir.meta import graphsel_meta
from graphsel.pipeline.passbase import Contract, Diagnostic, Pass, PassResult
from graphsel.pipeline.registry import register_pass
from graphsel.pipeline.select import ModuleSelection

from .edges import GateGraph, Region, block_candidates, is_cut, module_classes, module_region, residual_branches
from .gate import INIT_LOGIT, Gate

KINDS = ("residual", "blocks")
GATES_ROOT = "bsn_gates"


def _selects(selection: ModuleSelection, path: str, module: nn.Module, cls: type | None) -> bool:
    """``selection.selects`` where class rules also match the module's original class (a traced
    GraphModule rebuilds composite modules as plain ``nn.Module`` s)."""
    def match(rules) -> bool:
        if any(isinstance(r, type) and cls is not None and issubclass(cls, r) for r in rules):
            return True
        return ModuleSelection._matches(rules, path, module)
    if selection.include is not None and not match(selection.include):
        return False
    return not (selection.exclude is not None and match(selection.exclude))


def _gate_name(path: str, fallback: str) -> str:
    return (path or fallback).replace(".", "_")


@register_pass
class BudgetGates(Pass):
    """Gate every residual branch, block or listed module (see the module docstring)."""

    name = "budget_gates"
    contract = Contract.EXACT

    def __init__(self, on: Any = "residual", init: float = INIT_LOGIT, include: Any = None, exclude: Any = None):
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init) or init <= 0:
            raise GraphselError(f"budget_gates: init must be a positive finite logit (the gate starts on, so "
                                f"inserting it is exact), got {init!r}")
        if isinstance(on, str) and on in KINDS:
            paths = None
        elif on is None or (isinstance(on, (list, tuple)) and not on):
            raise GraphselError(f"budget_gates: on must be 'residual', 'blocks', or module paths (names, globs, "
                                f"classes, a predicate or a list of them), got {on!r}")
        else:
            paths = ModuleSelection(include=on, owner="budget_gates (on=)")
        super().__init__(on=on, init=init, include=include, exclude=exclude)
        self.paths = paths
        self.selection = ModuleSelection(include, exclude, owner=self.name)

    # -- finding edges ------------------------------------------------------------------------
    def _residual(self, gm, ctx, diags) -> list[tuple[fx.Node, list[fx.Node], str, str]]:
        analysis = ctx.analysis("channels", gm)
        modules = module_index(gm)
        found, skipped = residual_branches(gm, analysis)
        for node, why in skipped:
            diags.append(Diagnostic(f"add not gated: {why}", node, level="info"))
        plan = []
        for br in found:
            why = self.selection.why_not(br.module, modules.get(br.module, gm))
            if why is not None:
                diags.append(Diagnostic(f"residual branch {why}", br.module or br.add.name, level="info"))
                continue
            plan.append((br.branch, [br.add], _gate_name(br.module, br.add.name),
                         f"residual branch of '{br.add.name}' ({br.layers} layer(s)"
                         f"{', projection shortcut' if br.projection else ''})"))
        return plan

    def _regions(self, gm, diags) -> list[Region]:
        modules = module_index(gm)
        if self.paths is None:
            found, skipped = block_candidates(gm)
            for path, why in skipped:
                diags.append(Diagnostic(f"block not gated: {why}", path, level="info"))
            return found
        self.paths.check_names(modules)
        exact = set(self.paths.names("include"))
        regions, taken = [], []
        called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        classes = module_classes(gm)
        for path, m in modules.items():
            if not path or isinstance(m, Gate) or not _selects(self.paths, path, m, classes.get(path)):
                continue
            if any(path.startswith(t + ".") for t in taken):
                continue               # inside a module gated already
            r = module_region(gm, path)
            if r.problem is not None:
                if path in exact:
                    raise GraphselError(f"budget_gates: on names '{path}', which {r.problem}; a gated module must "
                                        f"be called once and have one output")
                if path in called or m._modules:
                    diags.append(Diagnostic(f"module not gated: it {r.problem}", path))
                continue
            if is_cut(gm, set(r.nodes)):
                diags.append(Diagnostic("every input → output path passes through it: turning its gate off "
                                        "disconnects the network", path, level="warning"))
            regions.append(r)
            taken.append(path)
        return regions

    def _modules(self, gm, diags) -> list[tuple[fx.Node, list[fx.Node], str, str]]:
        modules = module_index(gm)
        plan = []
        for r in self._regions(gm, diags):
            why = self.selection.why_not(r.path, modules.get(r.path, gm))
            if why is not None:
                diags.append(Diagnostic(f"block {why}", r.path, level="info"))
                continue
            members = set(r.nodes)
            outside = [u for u in r.output.users if u not in members]
            plan.append((r.output, outside, _gate_name(r.path, r.output.name), f"output of module '{r.path}'"))
        return plan

    # -- the pass -----------------------------------------------------------------------------
    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
            raise GraphselError("budget_gates needs shapes: trace the model with example inputs "
                                "(graphsel.transform(model, passes, example_inputs))")
        diags: list[Diagnostic] = []
        kind = self.on if isinstance(self.on, str) and self.on in KINDS else "modules"
        plan = self._residual(gm, ctx, diags) if kind == "residual" else self._modules(gm, diags)
        state = graphsel_meta(gm).state.setdefault(self.name, {"gates": {}})
        added = []
        for node, consumers, base, what in plan:
            path = add_module(gm, f"{GATES_ROOT}.{base}", Gate(self.init))
            with gm.graph.inserting_after(node):
                g = gm.graph.call_module(path, (node,))
            g.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "type")})
            for user in consumers:
                user.replace_input_with(node, g)
            added.append(path)
            state["gates"][path] = {"on": kind, "edge": node.name, "what": what}
            diags.append(Diagnostic(f"gated the {what}", path, level="info"))
        if added:
            gm.graph.lint()
            GateGraph(gm).wire()
            gm.recompile()
        else:
            what = {"residual": "no residual branch", "blocks": "no block summed with other edges",
                    "modules": "no selected module"}[kind]
            diags.append(Diagnostic(f"no-op: {what} to gate (0 gates)", level="info"))
        return PassResult(gm, modified=bool(added),
                          stats={"gates": len(added), "on": kind,
                                 "skipped": sum(d.level in ("skip", "warning") for d in diags)},
                          diagnostics=diags)
