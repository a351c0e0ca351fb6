"""Budgeted super networks (BSN; paper 004, ``methods.md`` §4) as a subpackage, one job per file:

* :mod:`.gate` — :class:`Gate` (scalar ``logit``, Bernoulli per sample in training, threshold in
  eval, exact zero for disconnected edges), :func:`gates`, :func:`set_gates`, :func:`set_sampling`;
* :mod:`.edges` — residual branches, blocks and module outputs on the traced graph; the nodes an
  architecture keeps (:class:`GateGraph`);
* :mod:`.insert` — the pass :class:`BudgetGates` (``budget_gates``);
* :mod:`.costs` — MACs, parameters, measured time and the distributed computation cost of
  sampled architectures (:class:`ArchitectureCost`, :func:`parallel_steps`, :func:`latency_table`);
* :mod:`.train` — REINFORCE under a budget (:class:`BudgetedTrainer`);
* :mod:`.extract` — the pass :class:`BSNExtract` (``bsn_extract``);
* :mod:`.fabrics` — the ResNet fabric and the convolutional neural fabric of the paper's appendix.

    gm = graphsel.transform(model, [("budget_gates", {"on": "residual"})], x)
    trainer = bsn.BudgetedTrainer(gm, fraction=0.5, cost="macs")
    opt = torch.optim.SGD(trainer.param_groups(logit_lr=0.1), lr=0.05, momentum=0.9)
    trainer.fit(loader, opt, epochs=5)
    slim = graphsel.transform(gm, ["bsn_extract"], x)      # verified equal to gm in eval
"""
from .gate import INIT_LOGIT, Gate, eval_values, gate_logits, gates, set_gates, set_sampling
from .edges import GateGraph, ResidualBranch, block_candidates, residual_branches, wire_gates
from .insert import BudgetGates
from .costs import KINDS, ArchitectureCost, latency_table, parallel_steps
from .train import DEFAULT_LAMBDA, BudgetedTrainer, StepStats, default_lambda
from .extract import BSNExtract
from .fabrics import ConvNeuralFabric, ResNetFabric, residual_function

__all__ = [
    "Gate", "gates", "set_gates", "set_sampling", "gate_logits", "eval_values", "INIT_LOGIT", "BudgetGates",
    "BSNExtract", "ArchitectureCost", "parallel_steps", "latency_table", "KINDS", "BudgetedTrainer", "StepStats",
    "default_lambda", "DEFAULT_LAMBDA", "GateGraph", "ResidualBranch", "residual_branches", "block_candidates", "wire_gates",
    "ResNetFabric", "ConvNeuralFabric", "residual_function",
]
