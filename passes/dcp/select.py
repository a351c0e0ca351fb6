"""Phase 2 of DCP: greedy channel selection for one layer (paper 003, Algorithm 2).

For a layer with weight W (C_out × C × …) and input X in the network being pruned, the loss is

    L(W) = mse_weight · L_M(W) + λ · L_S^p(W)
    L_M  = 1/(2Q) Σ ‖O − O*‖²      (O = layer(X; W), O* the original network's output of the layer,
                                     summed over output channels, Q = batch × positions: the paper;
                                     ``mse_reduction="mean"``: the mean over every element, as the
                                     authors' code's nn.MSELoss — C_out times smaller)
    L_S^p = cross-entropy of the segment's classifier (an auxiliary head, or the model's output
            for the last segment) run on O through the rest of the segment.

Start with no channel selected and W = 0. Repeat: accumulate ∂L/∂W over the selection data;
score every unselected input channel k by ‖∂L/∂W[:, k]‖_F (``score="paper"``) or by
Σ_j ‖∂L/∂W[j, k]‖_F (``score="authors"``, their code's sum of per-filter norms); add the best;
restore its weights from the original layer; optimise the selected columns by masked SGD
(``steps`` steps, momentum reset per selection). Stop when ``target`` channels are selected, or —
DCP-Adapt, ``adapt=ε`` — when |L^{t−1} − L^t| / L^0 ≤ ε (L^t: the loss after t selections).
Unselected columns stay exactly zero.

Cost: the layer's input, the original output and the values the rest of the segment reads are
computed once per batch (the prefix, no gradient) and cached while they fit in ``cache_bytes``;
every pass over the data then runs only the layer and the rest of its segment — once per batch,
never once per candidate channel (one gradient gives every candidate's score). Sums over the data
(gradients, losses) are made in one place, :func:`accumulate`.

Under torch.distributed (``process_group``; default: the default group when initialised, see
:mod:`graphsel.distributed`) each rank holds its own selection data: :func:`accumulate` sums the
gradients, losses and sample counts over the ranks, and each masked-SGD step uses the gradient of
the mean loss over the ranks' batches of that step. Every rank then makes the same choices, those
of one process whose batch i is the ranks' batches i concatenated. The ranks must hold the same
number of batches (or be given the same ``steps``); this is checked.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from graphsel import distributed as gd

from .data import DataSource, to_device
from .subgraph import Segment, extract

SCORES = ("paper", "authors")
MSE_REDUCTIONS = ("paper", "mean")


@dataclass
class Batch:
    x: torch.Tensor
    reference: torch.Tensor
    sides: list
    targets: torch.Tensor


@dataclass
class Totals:
    """Sums over the data at one W: the gradient, the losses, the samples (one place to all-reduce)."""
    grad: torch.Tensor | None
    loss: float
    mse: float
    ce: float
    samples: int

    def mean(self) -> "Totals":
        n = max(1, self.samples)
        return Totals(None if self.grad is None else self.grad.div_(n), self.loss / n, self.mse / n, self.ce / n, n)


@dataclass
class LayerSelection:
    """The outcome for one layer: kept input channels (in selection order), the loss after each
    number of selections (``losses[t]`` = L^t, ``losses[0]`` with nothing selected), why it stopped
    (``"target"`` or ``"adapt"``), the final weight, seconds."""
    kept: list[int]
    target: int
    channels: int
    losses: list[float] = field(default_factory=list)
    stopped: str = "target"
    weight: torch.Tensor | None = None
    seconds: float = 0.0

    @property
    def removed(self) -> list[int]:
        keep = set(self.kept)
        return [i for i in range(self.channels) if i not in keep]


class LayerProblem:
    """The data and graph pieces the loss of one layer needs (see the module docstring).

    ``work``: the graph being pruned (its layer module is optimised); ``reference``: the original
    graph (same node names; its modules untouched); ``target``: the node of the segment's logits.
    """

    def __init__(self, work: fx.GraphModule, reference: fx.GraphModule, layer: str, target: str | None,
                 data: DataSource, *, lam: float = 1.0, mse_weight: float = 1.0, mse_reduction: str = "paper",
                 cache_bytes: float = 1 << 30):
        self.lam, self.mse_weight = float(lam), float(mse_weight)
        self.mse_reduction = mse_reduction
        self.segment = Segment(work, layer, target, with_suffix=self.lam > 0)
        node = next(n for n in work.graph.nodes if n.name == layer)
        self.module: nn.Module = work.get_submodule(node.target)
        ref_node = next(n for n in reference.graph.nodes if n.name == layer)
        self.reference = extract(reference, [], [ref_node], model_inputs=True)
        self.channel_dim = -1 if isinstance(self.module, nn.Linear) else 1
        self.data = data
        self.cache_bytes = cache_bytes
        self._cache: list[Batch] | None = None
        w = self.module.weight
        self.device, self.dtype = w.device, w.dtype

    # -- data -----------------------------------------------------------------------------
    def _prepare(self, inputs, targets) -> Batch:
        inputs, targets = to_device(inputs, targets, self.device, self.dtype)
        with torch.no_grad():
            x, sides = self.segment.run_prefix(inputs)
            ref = self.reference(*inputs)[0]
        return Batch(x, ref, sides, targets)

    def build_cache(self) -> bool:
        """Compute the prefix of every batch once and keep it while it fits in ``cache_bytes``
        (returns whether it does); otherwise every pass recomputes it."""
        cache, size = [], 0
        for inputs, targets in self.data:
            b = self._prepare(inputs, targets)
            size += sum(t.numel() * t.element_size() for t in [b.x, b.reference, b.targets] + b.sides
                        if isinstance(t, torch.Tensor))
            if size > self.cache_bytes:
                return False
            cache.append(b)
        self._cache = cache
        return True

    def batches(self) -> Iterator[Batch]:
        """One pass over the data."""
        if self._cache is not None:
            yield from self._cache
            return
        for inputs, targets in self.data:
            yield self._prepare(inputs, targets)

    # -- loss -----------------------------------------------------------------------------
    def loss(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, L_M, L_S) on one batch at the layer's current weight."""
        out = self.module(b.x)
        zero = out.new_zeros(())
        mse = zero
        if self.mse_weight:
            if self.mse_reduction == "mean":
                mse = (out - b.reference).pow(2).mean()
            else:
                positions = out.numel() // out.shape[self.channel_dim]
                mse = (out - b.reference).pow(2).sum() / (2 * positions)
        ce = zero
        if self.lam:
            logits = self.segment.run_suffix(out, b.sides)
            ce = F.cross_entropy(logits, b.targets)
        return self.mse_weight * mse + self.lam * ce, mse, ce


def accumulate(problem: LayerProblem, weight: torch.Tensor, grad: bool = True, *,
               process_group=None) -> Totals:
    """Sample-weighted sums over one pass of the data at ``weight`` (the layer's parameter): the
    gradient ∂L/∂W, the losses and the sample count — the one place where statistics cross
    batches, summed over the ranks under torch.distributed (module docstring)."""
    group = gd.resolve_group(process_group)
    total = Totals(None, 0.0, 0.0, 0.0, 0)
    for b in problem.batches():
        n = len(b.targets)
        with torch.set_grad_enabled(grad):
            loss, mse, ce = problem.loss(b)
        if grad:
            g, = torch.autograd.grad(loss, weight)
            g.mul_(n)
            total.grad = g if total.grad is None else total.grad.add_(g)
        total.loss += float(loss.detach()) * n
        total.mse += float(mse.detach()) * n
        total.ce += float(ce.detach()) * n
        total.samples += n
    if grad and total.grad is None:
        total.grad = torch.zeros_like(weight)
    if group is not None:
        what = "DCP's sums over the selection data (accumulate)"
        if grad:
            total.grad = gd.all_reduce_sum(total.grad, group, what=what)
        loss, mse, ce, samples = gd.sum_over([total.loss, total.mse, total.ce, total.samples], group, what=what)
        total = Totals(total.grad, loss, mse, ce, int(samples))
    return total.mean()


def channel_scores(grad: torch.Tensor, score: str = "paper") -> torch.Tensor:
    """One score per input channel (dimension 1 of ``grad``): ‖grad[:, k]‖_F (``"paper"``) or
    Σ_j ‖grad[j, k]‖_F (``"authors"``)."""
    sq = grad.pow(2)
    if score == "authors":
        per_filter = sq.sum(dim=tuple(range(2, grad.dim()))) if grad.dim() > 2 else sq
        return per_filter.sqrt().sum(0)
    return sq.sum(dim=[d for d in range(grad.dim()) if d != 1]).sqrt()


def _column_mask(weight: torch.Tensor, kept: list[int]) -> torch.Tensor:
    mask = torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device)
    mask[kept] = 1
    return mask.view(1, -1, *([1] * (weight.dim() - 2)))


def masked_sgd(problem: LayerProblem, weight: torch.Tensor, kept: list[int], steps: int, lr: float,
               momentum: float, stream: Iterator[Batch], *, process_group=None) -> None:
    """``steps`` SGD steps on the selected columns of ``weight`` (the others stay exactly zero).
    Each step's gradient is one batch's; under torch.distributed, that of the mean loss over the
    ranks' batches of the step."""
    group = gd.resolve_group(process_group)
    mask = _column_mask(weight, kept)
    buf = torch.zeros_like(weight)
    for b in itertools.islice(stream, steps):
        loss, _, _ = problem.loss(b)
        g, = torch.autograd.grad(loss, weight)
        if group is not None:       # Σ_r n_r·g_r / Σ_r n_r, with the counts in the same all-reduce
            n = len(b.targets)
            both = gd.all_reduce_sum(torch.cat([g.reshape(-1) * n, g.new_tensor([n])]), group,
                                     what="DCP's masked SGD step (masked_sgd)")
            g = (both[:-1] / both[-1]).view_as(g)
        with torch.no_grad():
            buf.mul_(momentum).add_(g * mask)
            weight.sub_(lr * buf)
            weight.mul_(mask)


def greedy_select(problem: LayerProblem, original: torch.Tensor, target: int, *, score: str = "paper",
                  adapt: float | None = None, steps: int | None = None, lr: float = 0.01,
                  momentum: float = 0.9, progress: bool | None = None, desc: str = "dcp",
                  process_group=None) -> LayerSelection:
    """Algorithm 2 on ``problem`` (see the module docstring). ``original``: the layer's weight
    before selection (columns are restored from it). The layer's parameter is set to zero first
    and left holding the selected, optimised weight. ``process_group``: see the module docstring."""
    t0 = time.perf_counter()
    group = gd.resolve_group(process_group)
    weight = problem.module.weight
    channels = weight.shape[1]
    target = max(1, min(int(target), channels))
    with torch.no_grad():
        weight.zero_()
    steps = len(problem.data) if steps is None else int(steps)
    gd.same_on_all_ranks((steps, target), group, what=f"DCP selection ({desc})", name="(masked-SGD steps, target)",
                         fix="give every rank the same number of selection batches (a DistributedSampler with "
                             "drop_last=True) or the same steps=")
    if problem._cache is None:
        problem.build_cache()
    stream = _stream(problem)
    kept: list[int] = []
    losses: list[float] = []
    stopped = "target"
    bar = tqdm(total=target, desc=desc, unit="ch", leave=False,
               disable=(not progress) if progress is not None else None)
    try:
        while len(kept) < target:
            totals = accumulate(problem, weight, process_group=group)
            losses.append(totals.loss)
            if adapt is not None and len(losses) >= 2 and \
                    abs(losses[-2] - losses[-1]) <= adapt * max(abs(losses[0]), 1e-12):
                stopped = "adapt"
                break
            s = channel_scores(totals.grad, score)
            s[kept] = -float("inf")
            k = int(torch.argmax(s))
            kept.append(k)
            with torch.no_grad():
                weight[:, k] = original[:, k]
            if steps > 0:
                masked_sgd(problem, weight, kept, steps, lr, momentum, stream, process_group=group)
            bar.update(1)
            bar.set_postfix(loss=f"{totals.loss:.4g}", refresh=False)
    finally:
        bar.close()
    return LayerSelection(kept, target, channels, losses, stopped, weight.detach().clone(),
                          time.perf_counter() - t0)


def _stream(problem: LayerProblem) -> Iterator[Batch]:
    """Batches for SGD steps, pass after pass over the data."""
    def passes():
        while True:
            yield problem.batches()
    return itertools.chain.from_iterable(passes())
