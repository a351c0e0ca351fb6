"""The :class:`Gate` module of budgeted super networks (BSN; paper 004, ``methods.md`` §4).

A gate sits on one edge of the super network (a residual branch, a block, a fabric connection)
and multiplies that edge's output by ``h``:

* **training** (``gate.training`` and ``gate.sampling``): ``h ~ Bernoulli(σ(logit))``, one draw per
  sample (dimension 0 is the batch); the draw is kept in ``gate.last_h`` for REINFORCE;
* **warm-up** (training with ``sampling=False``, :func:`set_sampling`): ``h = 1`` (the whole
  super network trains, as in the paper's first epochs);
* **eval**: ``h = 1[σ(logit) > 0.5]``, i.e. ``logit > 0``.

``logit`` is a scalar parameter initialised to 3 (σ(3) ≈ 0.95), so a fresh gate is on in eval and
inserting gates is exact.

**Disconnected edges are exactly zero.** An edge whose input is cut off from every source of the
graph by gates that are off (a fabric node whose incoming edges are all off) would compute a
constant (a BatchNorm shift, say); the paper's reference code leaves those constants in. Here the
gate's effective value is ``h · alive(input)``, where ``alive`` is the structure the
``budget_gates`` pass wires into every gate: the edge's input is alive when a path from a source
reaches it without crossing a gate (``free``), or when one of the nearest gates upstream of it is
on and alive (``upstream``). The effective value of the last forward is ``gate.last_eff``; the
cost model (:mod:`.costs`) and the extraction (:mod:`.extract`) use the same definition, so the
gated forward, the cost of an architecture and the extracted network agree.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import math

import torch
import torch.nn as nn

from graphsel.ops import OpSpec, carry_rule, register_op

INIT_LOGIT = 3.0


class Gate(nn.Module):
    """``y = h · x`` with ``h`` a Bernoulli gate on the whole edge (see the module docstring)."""

    def __init__(self, init: float = INIT_LOGIT):
        super().__init__()
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
            raise TypeError(f"Gate: init must be a finite number (the initial logit), got {init!r}")
        self.logit = nn.Parameter(torch.tensor(float(init)))
        self.sampling = True
        self.free = True                      # the edge's input is reached from a source without a gate
        self.upstream: tuple[Gate, ...] = ()  # nearest gates upstream of the edge's input (when not free)
        self.last_h: torch.Tensor | None = None    # the last draw (per sample in training), detached
        self.last_eff: torch.Tensor | None = None  # the last effective value h · alive(input)

    # -- distribution ------------------------------------------------------------------------------
    @property
    def probability(self) -> torch.Tensor:
        """σ(logit), detached."""
        return torch.sigmoid(self.logit.detach())

    @property
    def is_on(self) -> bool:
        """The eval-mode value ``σ(logit) > 0.5`` (before connectivity)."""
        return bool(self.logit.detach() > 0)

    def alive(self) -> torch.Tensor | bool:
        """Whether the edge's input is connected in this forward (per sample in training)."""
        if self.free:
            return True
        out: torch.Tensor | bool = False
        for g in self.upstream:
            if g.last_eff is None:
                raise RuntimeError("Gate: an upstream gate has not run in this forward; the gates' wiring is "
                                   "stale (run the budget_gates pass again after editing the graph)")
            out = g.last_eff if out is False else torch.logical_or(out, g.last_eff)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.sampling:
            n = x.shape[0] if x.dim() else 1
            p = torch.sigmoid(self.logit.detach()).to(torch.float32).expand(n)
            h = torch.bernoulli(p).to(torch.bool)
        else:
            on = self.logit.detach() > 0 if not self.training else torch.ones((), dtype=torch.bool)
            h = on
        self.last_h = h
        alive = self.alive()
        eff = h if alive is True else (torch.logical_and(h, alive) if alive is not False else torch.zeros_like(h))
        self.last_eff = eff
        if eff.dim() == 0:
            return x if bool(eff) else torch.zeros_like(x)
        return x * eff.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))

    def extra_repr(self) -> str:
        return f"logit={float(self.logit.detach()):.3f}, p={float(self.probability):.3f}" + \
            ("" if self.free else f", upstream={len(self.upstream)}")


def gates(model: nn.Module) -> list[tuple[str, Gate]]:
    """``(name, gate)`` for every :class:`Gate` of ``model``, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"gates: expected an nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Gate)]


def gate_logits(model: nn.Module) -> list[nn.Parameter]:
    """The ``logit`` parameters of every gate (their own optimiser group)."""
    return [g.logit for _, g in gates(model)]


def set_sampling(model: nn.Module, sampling: bool) -> None:
    """Turn sampling on or off for every gate (off in training: every gate is on, the warm-up)."""
    for _, g in gates(model):
        g.sampling = bool(sampling)


def set_gates(model: nn.Module, on: Mapping[str, bool] | Iterable[str], *, value: float = INIT_LOGIT) -> None:
    """Set gates on or off by name: a mapping ``{name: bool}``, or the names to turn **off** (every
    other gate on). Sets ``logit = ±value`` (eval: on when positive)."""
    table = dict(gates(model))
    if isinstance(on, Mapping):
        wanted = {str(k): bool(v) for k, v in on.items()}
    else:
        off = set(on) if not isinstance(on, str) else {on}
        wanted = {k: k not in off for k in table}
        unknown = off - set(table)
        if unknown:
            raise KeyError(f"set_gates: no gate named {sorted(unknown)[0]!r}; gates: {', '.join(table) or '(none)'}")
    for name, v in wanted.items():
        if name not in table:
            raise KeyError(f"set_gates: no gate named {name!r}; gates: {', '.join(table) or '(none)'}")
        with torch.no_grad():
            table[name].logit.fill_(abs(value) if v else -abs(value))


def eval_values(model: nn.Module) -> dict[str, bool]:
    """``{name: σ(logit) > 0.5}`` for every gate (before connectivity)."""
    return {name: g.is_on for name, g in gates(model)}


def iter_gate_stats(model: nn.Module) -> Iterator[tuple[str, float, bool]]:
    """``(name, probability, eval value)`` per gate."""
    for name, g in gates(model):
        yield name, float(g.probability), g.is_on


def _gate_cost(module: Gate, input_shapes, output_shape) -> dict:
    # one multiplication per element while gated (0 MACs: gates disappear in the extracted network)
    return {"macs": 0, "other_flops": math.prod(output_shape) if output_shape else 0}


# the one place the gate is taught to graphsel: a leaf (it has a channel rule), per-element scale
# of each sample (channels pass through: carry_rule), cost above
register_op(Gate, OpSpec("bsn_gate", channels=carry_rule, cost=_gate_cost, category="elementwise", chain=True))
