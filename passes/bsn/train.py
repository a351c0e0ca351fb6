"""Training a gated super network under a budget (BSN; paper 004 eq. 8–18, ``methods.md`` §4).

Per sample ``i`` the gates draw an architecture ``H_i``; the objective is

    Δ(f(x_i, H_i), y_i) + λ · max(0, C(H_i) − C_budget) / C_budget

The weights get the ordinary gradient of the task loss ``Δ`` (through the sampled network). The
gate logits get REINFORCE: ``∇_a = mean_i[(r_i − b) ∇_a log p(H_i | a)]`` with the reward
``r_i = Δ_i + λ·max(0, C(H_i) − C_budget)/C_budget`` (a loss: lower is better) and the batch-mean
baseline ``b``; ``log p(H | a) = Σ_g h_g log σ(a_g) + (1 − h_g) log(1 − σ(a_g))``. Both gradients
come from one surrogate loss, ``mean_i Δ_i + mean_i (r_i − b) log p(H_i | a)``, so one
``backward()`` and one optimiser step do both; the logits have their own parameter group
(:meth:`BudgetedTrainer.param_groups`).

**λ and the scale of the cost.** The paper picks λ "based on the order of magnitude m of the
maximum authorized cost", cross-validating over 10^(m−1) … 10^(m+1): the penalty's scale must
follow the cost's, whose units (MACs ~10⁷, steps ~10¹) differ by orders of magnitude. We make
that dependence exact by measuring the excess relative to the budget,

    λ · max(0, C(H) − C_budget) / C_budget

(the paper's formula with λ_raw = λ / C_budget), so that λ is a pure number, the same for
MACs, parameters, seconds and steps. The default ``λ = 5`` (:data:`DEFAULT_LAMBDA`) is tuned:
on the Fashion-MNIST benchmark's fabric, a simulation of the REINFORCE dynamics over its real
cost model (per-gate task-loss effects 0.02–0.3, per-sample noise 0.7, 300 iterations of batch
128, SGD with momentum 0.9 at logit learning rates 0.05–0.1) meets budgets of 25, 50 and 75 % of
the MACs and 75 % of the steps on 2 units with λ from 2 to 10 at learning rate 0.1; a penalty of
1 per percentage point of the super network's cost (λ = 25–75 here) drives almost every gate of
the 25 % run off — it overshoots, and the task loss is too weak to bring edges back (a real
Fashion-MNIST run did the same: 8 % of the MACs after one epoch); λ = 2 misses the 75 % budgets
at learning rate 0.05; λ = 10 ends the 25 % run at 8–16 % of the MACs. 5 is the middle of the
working range (``python -m benchmarks.bsn_fashion_mnist --simulate-lambda`` reruns the simulation).

The baseline and the gate statistics are computed in one place, :meth:`BudgetedTrainer.statistics`.

**torch.distributed.** Wrap the gated GraphModule in ``DistributedDataParallel`` (default
settings) and give the wrapper to the trainer: the forward goes through it, the gates and the
cost model are the module's. With ``process_group`` (default: the default group when
initialised, see :mod:`graphsel.distributed`) the baseline is the mean reward of the global batch
(reward sums and counts all-reduced), the gate statistics and the epoch records are over every
rank, and in the warm-up, where no logit takes part in the loss, the logits are added with weight
0 so that DDP's ``find_unused_parameters=False`` finds a gradient for each. Each rank draws its own
architectures (``torch.bernoulli`` on the global generator): seed the ranks differently
(``torch.manual_seed(seed + rank)``) for independent draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from graphsel import distributed as gd
from graphsel.errors import GraphselError

from .costs import KINDS, ArchitectureCost
from .gate import gates, set_sampling


DEFAULT_LAMBDA = 5.0


def default_lambda(budget: float | None = None) -> float:
    """λ for the penalty on the excess relative to the budget (module docstring): a pure number,
    :data:`DEFAULT_LAMBDA` whatever the budget (the argument is accepted for symmetry)."""
    return DEFAULT_LAMBDA


@dataclass
class StepStats:
    """What one training step measured (costs as fractions of the super network's)."""
    loss: float
    task_loss: float
    penalty: float
    cost: float                  # mean sampled cost of the batch: an estimate of the expected cost
    over_budget: float           # fraction of the batch's architectures over the budget
    correct: int = 0
    samples: int = 0
    gate_on: list[float] = field(default_factory=list)   # per gate, fraction of the batch with h = 1


class BudgetedTrainer:
    """REINFORCE training of a gated GraphModule under a cost budget (module docstring).

    ``budget``: the largest authorised cost in the cost's unit (MACs, parameters, seconds or
    steps), or ``fraction`` of the whole super network's cost (one of the two). ``cost``: one of
    ``"macs"``, ``"params"``, ``"time"``, ``"steps"`` (``units`` parallel units). ``lam``: λ
    (default :func:`default_lambda`). ``criterion(output, target)`` must return one loss per
    sample (default: cross-entropy, ``reduction="none"``). ``model`` may be wrapped in
    ``DistributedDataParallel``; ``process_group``: see the module docstring.
    """

    def __init__(self, model: fx.GraphModule, budget: float | None = None, *, fraction: float | None = None,
                 cost: str = "macs", units: int | None = None, lam: float | None = None,
                 criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 cost_model: ArchitectureCost | None = None, latency: dict | None = None, process_group=None):
        self.process_group = gd.resolve_group(process_group)
        module = gd.unwrap(model)
        if not gates(module):
            raise GraphselError("BudgetedTrainer: the model has no budget gates; run "
                                "graphsel.transform(model, ['budget_gates'], example_inputs) first")
        if cost not in KINDS:
            raise GraphselError(f"BudgetedTrainer: unknown cost {cost!r}; choose one of {', '.join(KINDS)}")
        if cost == "steps" and (isinstance(units, bool) or not isinstance(units, int) or units < 1):
            raise GraphselError(f"BudgetedTrainer: the 'steps' cost needs units, a positive int of parallel units; "
                                f"got {units!r}")
        if (budget is None) == (fraction is None):
            raise GraphselError("BudgetedTrainer: give either budget= (in the cost's unit) or fraction= (of the "
                                "super network's cost)")
        for name, v in (("budget", budget), ("fraction", fraction)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v <= 0):
                raise GraphselError(f"BudgetedTrainer: {name} must be a positive finite number, got {v!r}")
        self.model, self.module = model, module          # the forward goes through the wrapper
        self.kind, self.units = cost, units
        self.cost_model = cost_model if cost_model is not None else ArchitectureCost(module, units=units,
                                                                                      latency=latency)
        self.full = self.cost_model.full_cost(cost, units)
        if self.full <= 0:
            raise GraphselError(f"BudgetedTrainer: the super network's {cost} cost is {self.full}; nothing to budget")
        self.budget = float(budget) if budget is not None else float(fraction) * self.full
        self.fraction = self.budget / self.full
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0
                                or not math.isfinite(lam)):
            raise GraphselError(f"BudgetedTrainer: lam must be a non-negative finite number, got {lam!r}")
        self.lam = float(lam) if lam is not None else default_lambda(self.budget)
        self.criterion = criterion if criterion is not None else (
            lambda out, y: F.cross_entropy(out, y, reduction="none"))
        self._gates = [g for _, g in gates(module)]
        names = [n for n, _ in gates(module)]
        if names != self.cost_model.gate_names and sorted(names) != sorted(self.cost_model.gate_names):
            raise GraphselError("BudgetedTrainer: the cost model's gates are not the model's")
        order = {n: i for i, n in enumerate(names)}
        self._logit_order = [order[n] for n in self.cost_model.gate_names]

    # -- optimiser groups -----------------------------------------------------------------------
    def logits(self) -> torch.Tensor:
        """The gate logits in the cost model's gate order (a differentiable 1-d tensor)."""
        return torch.stack([self._gates[i].logit for i in self._logit_order])

    def param_groups(self, weight_decay: float = 1e-4, logit_lr: float | None = None,
                     logit_weight_decay: float = 0.0) -> list[dict]:
        """Parameter groups for one optimiser: weights (decay on ≥ 2-d tensors), biases and norm
        parameters (no decay), and the gate logits (their own group: ``logit_lr`` when given)."""
        logit_ids = {id(g.logit) for g in self._gates}
        decay, no_decay = [], []
        for p in self.module.parameters():
            if id(p) in logit_ids or not p.requires_grad:
                continue
            (decay if p.ndim > 1 else no_decay).append(p)
        logits = {"params": [g.logit for g in self._gates], "weight_decay": logit_weight_decay, "name": "gate_logits"}
        if logit_lr is not None:
            logits["lr"] = logit_lr
        return [{"params": decay, "weight_decay": weight_decay, "name": "weights"},
                {"params": no_decay, "weight_decay": 0.0, "name": "weights_no_decay"}, logits]

    # -- the objective ----------------------------------------------------------------------------
    def sampled_costs(self) -> np.ndarray:
        """Costs (fractions of the super network's) of the architectures drawn in the last forward."""
        return self.cost_model.sampled(self.kind, self.units) / self.full

    def statistics(self, reward: torch.Tensor, H: np.ndarray) -> dict[str, Any]:
        """The REINFORCE baseline (mean reward of the batch) and the gate statistics (fraction of
        the batch with each gate on); under torch.distributed, of the global batch: every rank's."""
        if self.process_group is None:
            return {"baseline": reward.mean(), "gate_on": H.mean(axis=0).tolist(), "samples": int(reward.numel())}
        local = torch.cat([reward.detach().double().sum().view(1), torch.tensor([float(reward.numel())]).double(),
                           torch.as_tensor(np.asarray(H, dtype=np.float64).sum(axis=0))])
        total = gd.all_reduce_sum(local, self.process_group, what="BudgetedTrainer's baseline and gate statistics")
        n = total[1]
        return {"baseline": (total[0] / n).to(device=reward.device, dtype=reward.dtype),
                "gate_on": (total[2:] / n).tolist(), "samples": int(n)}

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, StepStats]:
        """The surrogate loss of one batch (after the forward that drew the architectures)."""
        task = self.criterion(output, target)
        if task.dim() != 1 or task.shape[0] != output.shape[0]:
            raise GraphselError(f"BudgetedTrainer: the criterion must return one loss per sample "
                                f"(reduction='none'); got shape {tuple(task.shape)}")
        n = task.shape[0]
        sampling = all(g.training and g.sampling for g in self._gates)
        H = self.cost_model.graph.last_values()
        if H.shape[0] != n:
            H = np.broadcast_to(H, (n, H.shape[1]))
        costs = self.cost_model.of(H, self.kind, self.units) / self.full
        excess = np.maximum(0.0, costs - self.fraction) / self.fraction      # relative to the budget
        penalty = torch.as_tensor(self.lam * excess, dtype=task.dtype, device=task.device)
        reward = task.detach() + penalty
        stats = self.statistics(reward, H)
        total = task.mean()
        if sampling:
            a = self.logits()
            h = torch.as_tensor(np.ascontiguousarray(H), dtype=a.dtype, device=a.device)
            logp = (h * F.logsigmoid(a) + (1 - h) * F.logsigmoid(-a)).sum(dim=1)
            total = total + ((reward - stats["baseline"]) * logp).mean()
        elif self.process_group is not None:     # every logit takes part, for DDP (module docstring)
            total = total + 0 * self.logits().sum()
        correct = int((output.argmax(1) == target).sum()) if output.dim() == 2 and target.dim() == 1 else 0
        return total, StepStats(float(total.detach()), float(task.detach().mean()), float(penalty.mean()),
                                float(costs.mean()), float((costs > self.fraction).mean()), correct, n,
                                stats["gate_on"])

    def step(self, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepStats:
        """Forward (drawing one architecture per sample), the surrogate loss, backward, step."""
        self.model.train()
        out = self.model(x)
        loss, stats = self.loss(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return stats

    # -- reporting --------------------------------------------------------------------------------
    def expected_cost(self, samples: int = 256) -> float:
        """E[C(H)] / C_full under the gates' current distribution (Monte Carlo)."""
        return self.cost_model.expected(self.kind, self.units, samples=samples) / self.full

    def eval_cost(self) -> float:
        """The exact cost of the eval architecture, in the cost's unit."""
        return self.cost_model.eval_cost(self.kind, self.units)

    def fit(self, loader: Iterable, optimizer: torch.optim.Optimizer, epochs: int = 1, *,
            scheduler: Any = None, warmup_epochs: int = 0, progress: bool | None = None,
            on_epoch_end: Callable[[dict], None] | None = None) -> list[dict]:
        """Train for ``epochs`` over ``loader`` (``(x, y)`` batches); the first ``warmup_epochs``
        train the whole super network without sampling (the paper's warm-up). ``scheduler`` is
        stepped after every iteration. The progress bar shows the batch's mean sampled cost (an
        estimate of the expected cost) against the budget, both as fractions of the super
        network's cost. Returns one record per epoch (under torch.distributed, over every rank's
        samples; the ranks must hold the same number of batches)."""
        if not isinstance(epochs, int) or epochs < 1:
            raise GraphselError(f"BudgetedTrainer.fit: epochs must be a positive int, got {epochs!r}")
        if self.process_group is not None and hasattr(loader, "__len__"):   # every step is a collective
            gd.same_on_all_ranks(len(loader), self.process_group, what="BudgetedTrainer.fit", name="the batches per epoch",
                                 fix="give every rank the same number of batches (a DistributedSampler with "
                                     "drop_last=True)")
        history = []
        for epoch in range(epochs):
            set_sampling(self.module, epoch >= warmup_epochs)
            totals = {"loss": 0.0, "task": 0.0, "cost": 0.0, "over": 0.0, "correct": 0, "samples": 0, "steps": 0}
            bar = tqdm(loader, desc=f"bsn {epoch + 1}/{epochs}", leave=False,
                       disable=(not progress) if progress is not None else None)
            for x, y in bar:
                s = self.step(x, y, optimizer)
                if scheduler is not None:
                    scheduler.step()
                totals["loss"] += s.loss * s.samples
                totals["task"] += s.task_loss * s.samples
                totals["cost"] += s.cost * s.samples
                totals["over"] += s.over_budget * s.samples
                totals["correct"] += s.correct
                totals["samples"] += s.samples
                totals["steps"] += 1
                bar.set_postfix_str(f"E[C] {s.cost:.3f} / budget {self.fraction:.3f}, loss {s.task_loss:.3f}")
            if self.process_group is not None:
                names = ("loss", "task", "cost", "over", "correct", "samples")
                summed = gd.sum_over([totals[k] for k in names], self.process_group,
                                     what="BudgetedTrainer.fit's epoch record")
                totals.update(zip(names, summed))
            seen = max(1, totals["samples"])
            record = {"epoch": epoch + 1, "sampling": epoch >= warmup_epochs, "loss": totals["loss"] / seen,
                      "task_loss": totals["task"] / seen, "train_accuracy": totals["correct"] / seen,
                      "sampled_cost": totals["cost"] / seen, "over_budget": totals["over"] / seen,
                      "expected_cost": self.expected_cost(), "eval_cost": self.eval_cost() / self.full,
                      "budget": self.fraction}
            history.append(record)
            if on_epoch_end is not None:
                on_epoch_end(record)
        set_sampling(self.module, True)
        return history
