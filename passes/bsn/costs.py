"""Costs of architectures sampled from a gated super network (BSN; paper 004, ``methods.md`` §4).

An *architecture* is one value per gate (a row of ``H``: in training, one row per sample, the
gates' draws; in eval, the thresholded logits). It keeps the nodes on an input → output path
whose gates are on (:meth:`.edges.GateGraph.kept`): gated-off edges and what they disconnect are
exactly zero in the gated forward, so these costs are the costs of the extracted network.

Cost kinds (:data:`KINDS`), each a sum over the kept nodes except ``steps``:

* ``"macs"`` — multiply-accumulates of convolutions, linear layers, matmuls and attention
  (graphsel's count, :mod:`graphsel.analysis.cost`) **plus one per BatchNorm output element**
  (BatchNorm folded into a per-channel scale and shift): the convention of paper 004, whose
  ResNet-110 costs 2.54e8 (2.529e8 conv + linear, 0.010e8 BatchNorm). Gates count 0 (they
  disappear from the extracted network);
* ``"params"`` — parameters of the kept nodes (memory), without the gates' logits;
* ``"time"`` — a latency table measured once per node (:func:`latency_table`: median over
  repeated eval forwards through an ``fx.Interpreter``, in seconds, at the example batch);
* ``"steps"`` — the distributed computation cost: the number of steps greedy list scheduling
  needs to run the architecture's layer DAG on ``units`` parallel units (paper 004 fig. 8),
  computed by :func:`parallel_steps` — which is :func:`graphsel.analysis.cost.distributed_cost`,
  the one implementation of the scheduling.

:class:`ArchitectureCost` evaluates them for many architectures at once (vectorised over the
rows of ``H``); ``expected`` is the mean under the gates' distribution (Monte Carlo with a fixed
seed), ``eval_cost`` the exact cost of the eval architecture.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Mapping

import numpy as np
import torch
import torch.fx as fx

from graphsel.analysis.cost import CostReport, distributed_cost, graph_cost
from graphsel.errors import GraphselError
from graphsel.ir.tracing import example_inputs_of
from graphsel.pipeline.verify import eval_mode

from .edges import GateGraph
from .gate import Gate

KINDS = ("macs", "params", "time", "steps")


def parallel_steps(dag: Mapping[Any, Any] | fx.GraphModule | CostReport, units: int) -> int:
    """The distributed computation cost: steps of greedy list scheduling of a DAG on ``units``
    parallel units (paper 004 fig. 8; :func:`graphsel.analysis.cost.distributed_cost` runs it).

    ``dag``: a mapping ``node -> predecessors`` in topological order (the order is the
    scheduling priority), a :class:`~graphsel.analysis.cost.CostReport`, or a shape-annotated
    GraphModule — then the layer DAG (nodes with MACs) of its eval architecture: with gates,
    gated-off edges and the nodes they disconnect are left out. A cycle, a predecessor that is
    not a node, or ``units < 1`` raise :class:`~graphsel.analysis.cost.CostError`.
    """
    if isinstance(dag, fx.GraphModule):
        dag = ArchitectureCost(dag).eval_dag()
    return distributed_cost(dag, units)


def latency_table(gm: fx.GraphModule, example_inputs: tuple | None = None, *, repeats: int = 5,
                  warmup: int = 1) -> dict[str, float]:
    """Seconds per node (median over ``repeats`` eval forwards after ``warmup``), measured with an
    ``fx.Interpreter`` on ``example_inputs`` (default: the graph's own). Gates count 0."""
    inputs = example_inputs if example_inputs is not None else example_inputs_of(gm)
    if inputs is None:
        raise GraphselError("latency_table needs example inputs: trace with example inputs or pass them")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"latency_table: repeats must be a positive int, got {repeats!r}")
    times: dict[str, list[float]] = {n.name: [] for n in gm.graph.nodes}

    class _Timed(fx.Interpreter):
        record = False

        def run_node(self, n):
            t0 = time.perf_counter()
            out = super().run_node(n)
            if self.record:
                times[n.name].append(time.perf_counter() - t0)
            return out

    interp = _Timed(gm)
    with torch.no_grad(), eval_mode(gm):
        for r in range(warmup + repeats):
            interp.record = r >= warmup
            interp.run(*inputs)
    modules = dict(gm.named_modules())
    out = {}
    for n in gm.graph.nodes:
        gate = n.op == "call_module" and isinstance(modules.get(n.target), Gate)
        out[n.name] = 0.0 if gate or not times[n.name] else statistics.median(times[n.name])
    return out


def _is_batchnorm(row) -> bool:
    return row.category == "norm" and "batchnorm" in row.kind.lower().replace("_", "")


class ArchitectureCost:
    """Costs of architectures of a gated GraphModule (see the module docstring).

    ``latency``: a :func:`latency_table` (measured on first use of ``"time"`` when omitted);
    ``units``: the default number of parallel units of ``"steps"``.
    """

    def __init__(self, gm: fx.GraphModule, *, latency: Mapping[str, float] | None = None, units: int | None = None):
        if not isinstance(gm, fx.GraphModule):
            raise TypeError(f"ArchitectureCost expects a traced GraphModule (graphsel.transform), got "
                            f"{type(gm).__name__}")
        if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
            raise GraphselError("the cost of an architecture needs shapes: trace the model with example inputs")
        self.gm = gm
        self.graph = GateGraph(gm)
        self.report = graph_cost(gm, totals_only=True)
        nodes = self.graph.nodes
        pos = {n.name: i for i, n in enumerate(nodes)}
        n = len(nodes)
        self._macs = np.zeros(n)
        self._params = np.zeros(n)
        self._layer = np.zeros(n, dtype=bool)
        for row in self.report.rows:
            i = pos.get(row.node)
            if i is None:
                continue
            gate = self.graph.column[i] >= 0
            self._layer[i] = row.macs > 0
            self._macs[i] = row.macs + (row.output_numel if _is_batchnorm(row) else 0)
            self._params[i] = 0 if gate else row.params
        self._latency_table = dict(latency) if latency is not None else None
        self._latency: np.ndarray | None = None
        self.units = units
        self._cond: list[dict[int, set[frozenset]]] | None = None
        self._steps_cache: dict[tuple[bytes, int], int] = {}

    # -- per node ---------------------------------------------------------------------------------
    @property
    def gate_names(self) -> list[str]:
        return list(self.graph.gate_names)

    @property
    def n_gates(self) -> int:
        return self.graph.n_gates

    def node_costs(self, kind: str) -> np.ndarray:
        """One value per graph node (additive kinds)."""
        if kind == "macs":
            return self._macs
        if kind == "params":
            return self._params
        if kind == "time":
            if self._latency is None:
                table = self._latency_table if self._latency_table is not None else latency_table(self.gm)
                self._latency = np.array([float(table.get(nd.name, 0.0)) for nd in self.graph.nodes])
            return self._latency
        raise ValueError(f"unknown cost kind {kind!r}; additive kinds: macs, params, time")

    # -- architectures ----------------------------------------------------------------------------
    def of(self, H: np.ndarray, kind: str = "macs", units: int | None = None) -> np.ndarray:
        """The cost of each architecture (row of ``H``, S × G booleans): an array of S floats."""
        if kind not in KINDS:
            raise ValueError(f"unknown cost kind {kind!r}; choose one of {', '.join(KINDS)}")
        kept = self.graph.kept(H)                         # N × S
        if kind == "steps":
            u = self._units(units)
            return np.array([self._steps(kept[:, s], u) for s in range(kept.shape[1])], dtype=float)
        return self.node_costs(kind) @ kept

    def _units(self, units: int | None) -> int:
        u = units if units is not None else self.units
        if u is None:
            raise ValueError("the 'steps' cost needs the number of parallel units (units=...)")
        if isinstance(u, bool) or not isinstance(u, int) or u < 1:
            raise GraphselError(f"units must be a positive int (parallel units), got {u!r}")
        return u

    def sampled(self, kind: str = "macs", units: int | None = None) -> np.ndarray:
        """The costs of the architectures the gates drew in the last forward (one per sample)."""
        return self.of(self.graph.last_values(), kind, units)

    def eval_values(self) -> np.ndarray:
        return self.graph.eval_values()

    def eval_cost(self, kind: str = "macs", units: int | None = None) -> float:
        """The exact cost of the eval architecture (σ(logit) > 0.5)."""
        return float(self.of(self.eval_values(), kind, units)[0])

    def full_cost(self, kind: str = "macs", units: int | None = None) -> float:
        """The cost of the whole super network (every gate on)."""
        return float(self.of(np.ones((1, self.n_gates), dtype=bool), kind, units)[0])

    def probabilities(self) -> np.ndarray:
        return np.array([float(g.probability) for g in self.graph.gate_modules])

    def expected(self, kind: str = "macs", units: int | None = None, *, samples: int = 1024, seed: int = 0) -> float:
        """The expected cost under the gates' distribution (Monte Carlo over ``samples`` draws)."""
        rng = np.random.default_rng(seed)
        H = rng.random((samples, self.n_gates)) < self.probabilities()[None, :]
        return float(self.of(H, kind, units).mean())

    def table(self, units: int | None = None, kinds: tuple[str, ...] = ("macs", "params", "steps")) -> dict[str, float]:
        """Eval-architecture costs: ``{kind: value}`` plus ``{kind}_full`` (the super network)."""
        out = {}
        for k in kinds:
            if k == "steps" and units is None and self.units is None:
                continue
            out[k] = self.eval_cost(k, units)
            out[f"{k}_full"] = self.full_cost(k, units)
        return out

    # -- the layer DAG and its schedule -------------------------------------------------------------
    def _conditions(self) -> list[dict[int, set[frozenset]]]:
        """Per layer node: ``{nearest layer predecessor: {sets of gates on the connecting paths}}``."""
        if self._cond is None:
            near: list[dict[int, set[frozenset]]] = []
            cond: list[dict[int, set[frozenset]]] = []
            column = self.graph.column
            for i, ins in enumerate(self.graph.index.inputs):
                merged: dict[int, set[frozenset]] = {}
                for j in ins:
                    for p, sets in near[j].items():
                        merged.setdefault(p, set()).update(sets)
                cond.append(merged if self._layer[i] else {})
                if self._layer[i]:
                    near.append({i: {frozenset()}})
                elif column[i] >= 0:
                    c = int(column[i])
                    near.append({p: {s | {c} for s in sets} for p, sets in merged.items()})
                else:
                    near.append(merged)
            self._cond = cond
        return self._cond

    def dag_of(self, kept: np.ndarray) -> dict[str, tuple[str, ...]]:
        """The layer DAG of one architecture (``kept``: N booleans), ``{layer: predecessors}`` in
        graph order."""
        cond = self._conditions()
        nodes = self.graph.nodes
        gate_kept = kept[self.graph.gate_nodes] if self.n_gates else np.zeros(0, dtype=bool)
        dag = {}
        for i in np.flatnonzero(self._layer & kept).tolist():
            preds = [p for p, sets in cond[i].items()
                     if kept[p] and any(all(gate_kept[c] for c in s) for s in sets)]
            dag[nodes[i].name] = tuple(nodes[p].name for p in sorted(preds))
        return dag

    def eval_dag(self) -> dict[str, tuple[str, ...]]:
        return self.dag_of(self.graph.kept(self.eval_values())[:, 0])

    def _steps(self, kept: np.ndarray, units: int) -> int:
        key = (np.packbits(kept).tobytes(), units)
        hit = self._steps_cache.get(key)
        if hit is None:
            if len(self._steps_cache) > 100_000:
                self._steps_cache.clear()
            hit = self._steps_cache[key] = parallel_steps(self.dag_of(kept), units)
        return hit
