"""Phase 1 of DCP: fine-tune the network with its auxiliary losses (paper 003, Algorithm S1).

:func:`finetune` trains a graph that carries auxiliary classifiers (``dcp_heads``) in place, on a
user's data loader:

* ``mode="alternate"`` (Algorithm S1): per mini-batch, one SGD step on each auxiliary loss
  L_S^p in turn, then one on the final loss L_f, each with its own forward pass (the paper's
  "based on the last W"; current PyTorch cannot step twice over one retained graph); the
  learning rate decays by τ (``decay``) per iteration. ``heads=[p]`` trains with L_S^p and L_f
  only — the paper's stage-p fine-tuning;
* ``mode="sum"`` (the authors' code): one step per mini-batch on L_f + ``aux_weight`` · Σ_p L_S^p.

It shows a progress bar and can resume: with ``state_path`` the model, optimizer, learning rate,
step count, losses and RNG state are saved every ``save_every`` steps and at the end, and a call
that finds the file continues from the saved step (earlier batches of the interrupted epoch are
skipped; a shuffling loader gives the same order only if its sampler is seeded per epoch).
``steps`` caps the total number of steps (e.g. to stop early and resume later).

The losses accumulated over the data are kept by one object (:class:`LossMeter`), the single
place where statistics cross batches.

Under torch.distributed (``process_group``; default: the default group when initialised, see
:mod:`graphsel.distributed`) each rank trains on its own batches and every step uses the gradient
of the mean loss over the ranks' batches of that step (gradients all-reduced, weighted by the
batch sizes), so the replicas stay identical; buffers (BatchNorm statistics) are rank 0's at the
end, as DistributedDataParallel makes them; the reported losses are means over every rank; only
rank 0 writes ``state_path``, which every rank must be able to read to resume. The ranks must
hold the same number of batches; this is checked. :func:`fit_heads` sums the BatchNorm statistics
over the ranks and fits each head on the features of every rank.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from graphsel import distributed as gd

from .data import as_source, to_device
from .errors import DCPError
from .heads import aux_model, heads_of

MODES = ("alternate", "sum")


class LossMeter:
    """Sample-weighted running means of named losses (the one place statistics cross batches)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0

    def update(self, n: int, **losses: float) -> None:
        self.count += n
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.count) for k, v in self.sums.items()}

    def state(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count}

    def load(self, state: dict[str, Any]) -> None:
        self.sums, self.count = dict(state["sums"]), int(state["count"])

    def reduced(self, process_group=None) -> "LossMeter":
        """The meter of every rank's samples (itself without torch.distributed)."""
        group = gd.resolve_group(process_group)
        if group is None:
            return self
        names = sorted(self.sums)
        gd.same_on_all_ranks(names, group, what="LossMeter.reduced", name="the names of the losses",
                             fix="every rank must record the same losses")
        *sums, count = gd.sum_over([self.sums[k] for k in names] + [self.count], group, what="LossMeter.reduced")
        out = LossMeter()
        out.sums, out.count = dict(zip(names, sums)), int(count)
        return out


def average_gradients(params: list[torch.Tensor], samples: int, group) -> None:
    """Replace each gradient by Σ_r n_r·g_r / Σ_r n_r over the ranks (``samples`` = n_r): the
    gradient of the mean loss over the union of the ranks' batches. Parameters without a gradient
    (None on every rank: the graph is the same) are left alone."""
    if group is None:
        return
    what = "the gradient all-reduce of dcp.finetune"
    grads = [p.grad for p in params if p.grad is not None]
    total = gd.sum_over([samples], group, what=what)[0]
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = gd.all_reduce_sum(torch.cat([g.reshape(-1) for g in same]) * samples, group, what=what) / total
        for g, part in zip(same, flat.split([g.numel() for g in same])):
            g.copy_(part.view_as(g))


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: steps done (in total, and resumed from), the mean losses over
    this call's steps (``final``, ``aux0``, ...), the learning rate reached, seconds."""
    steps: int
    resumed_from: int
    losses: dict[str, float] = field(default_factory=dict)
    lr: float = 0.0
    seconds: float = 0.0


def _check(gm, mode, heads, epochs, steps, lr, decay, aux_weight) -> list[int]:
    if not isinstance(gm, fx.GraphModule) or not heads_of(gm):
        raise DCPError("dcp.finetune: the model has no auxiliary classifiers; insert them first: "
                       "gm = graphsel.transform(model, [('dcp_heads', {'heads': 'auto'})], example_inputs)")
    if mode not in MODES:
        raise DCPError(f"dcp.finetune: mode must be one of {MODES} ('alternate': Algorithm S1, 'sum': one summed "
                       f"loss), got {mode!r}")
    n = len(heads_of(gm))
    chosen = list(range(n)) if heads is None else list(heads)
    if not chosen or any(isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < n for h in chosen):
        raise DCPError(f"dcp.finetune: heads must list auxiliary classifier indices in 0..{n - 1}, got {heads!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise DCPError(f"dcp.finetune: epochs must be an int ≥ 1, got {epochs!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise DCPError(f"dcp.finetune: steps must be None or an int ≥ 0, got {steps!r}")
    for name, v in (("lr", lr), ("decay", decay), ("aux_weight", aux_weight)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (name == "decay" and not 0 < v <= 1):
            raise DCPError(f"dcp.finetune: {name} must be a number {'in (0, 1]' if name == 'decay' else '≥ 0'}, "
                           f"got {v!r}")
    return chosen


def finetune(gm: fx.GraphModule, data: Any, *, epochs: int = 1, steps: int | None = None, lr: float = 0.01,
             momentum: float = 0.9, weight_decay: float = 1e-4, nesterov: bool = False, decay: float = 1.0,
             mode: str = "alternate", heads: Sequence[int] | None = None, aux_weight: float = 1.0,
             state_path: str | os.PathLike | None = None, save_every: int = 100,
             progress: bool | None = None, process_group=None) -> FinetuneResult:
    """Fine-tune ``gm`` (a graph with auxiliary classifiers) in place with the auxiliary losses;
    see the module docstring. ``data``: a re-iterable of ``(inputs, targets)`` batches."""
    chosen = _check(gm, mode, heads, epochs, steps, lr, decay, aux_weight)
    group = gd.resolve_group(process_group)
    source = as_source(data, "dcp.finetune")
    model = aux_model(gm)
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    per_epoch = len(source)
    total = epochs * per_epoch if steps is None else min(steps, epochs * per_epoch)
    meter = LossMeter()
    start, current_lr = 0, float(lr)
    path = Path(state_path) if state_path is not None else None
    if path is not None and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        try:
            gm.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise DCPError(f"dcp.finetune: {path} holds the state of another model or optimizer ({e}); delete it "
                           f"or give another state_path") from None
        start, current_lr = int(saved["step"]), float(saved["lr"])
        torch.set_rng_state(saved["rng"])
    gd.same_on_all_ranks((per_epoch, total, start), group, what="dcp.finetune",
                         name="(batches per epoch, steps, step resumed from)",
                         fix="give every rank the same number of batches (a DistributedSampler with drop_last=True), "
                             "and a state_path every rank reads (rank 0 writes it)")
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params else None

    def save(step: int) -> None:
        if path is None or gd.rank(group) != 0:
            return
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"step": step, "lr": current_lr, "model": gm.state_dict(), "optimizer": opt.state_dict(),
                    "rng": torch.get_rng_state(), "losses": meter.state()}, tmp)
        os.replace(tmp, path)

    def step_on(loss: torch.Tensor, samples: int) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params, samples, group)
        opt.step()

    flags = [(m, m.training) for m in gm.modules()]
    gm.train()
    t0 = time.perf_counter()
    step = start
    bar = tqdm(total=total, initial=min(start, total), desc="dcp phase 1", unit="step", leave=False,
               disable=(not progress) if progress is not None else None)
    try:
        for epoch in range(epochs):
            if step >= total:
                break
            for i, (inputs, targets) in enumerate(source):
                if epoch * per_epoch + i < start:
                    continue
                if step >= total:
                    break
                inputs, targets = to_device(inputs, targets, device, dtype)
                for param_group in opt.param_groups:
                    param_group["lr"] = current_lr
                losses: dict[str, float] = {}
                if mode == "sum":
                    main, aux = model(*inputs)
                    parts = {f"aux{h}": F.cross_entropy(aux[h], targets) for h in chosen}
                    final = F.cross_entropy(main, targets)
                    step_on(final + aux_weight * sum(parts.values()), len(targets))
                    losses = {"final": final.item(), **{k: v.item() for k, v in parts.items()}}
                else:
                    for h in chosen:
                        _, aux = model(*inputs)
                        loss = F.cross_entropy(aux[h], targets)
                        step_on(aux_weight * loss, len(targets))
                        losses[f"aux{h}"] = loss.item()
                    main, _ = model(*inputs)
                    final = F.cross_entropy(main, targets)
                    step_on(final, len(targets))
                    losses["final"] = final.item()
                meter.update(len(targets), **losses)
                current_lr *= decay
                step += 1
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in meter.means().items()}, refresh=False)
                if save_every and step % save_every == 0:
                    save(step)
        gd.broadcast_tensors(list(gm.buffers()), group, what="dcp.finetune (rank 0's buffers)")
        save(step)
    finally:
        bar.close()
        for m, t in flags:
            m.training = t
    return FinetuneResult(step, start, meter.reduced(group).means(), current_lr, time.perf_counter() - t0)


def fit_heads(gm: fx.GraphModule, data: Any, *, iters: int = 50, weight_decay: float = 1e-4,
              process_group=None) -> dict[str, float]:
    """Fit the auxiliary classifiers of ``gm`` to its frozen features (what the ``dcp`` pass does
    when the graph has no phase-1-trained heads): each head's BatchNorm gets the exact per-channel
    statistics of its pivot over the data (γ = 1, β = 0), then its Linear layer is fitted on the
    pooled features by L-BFGS (``iters`` iterations, cross-entropy + ``weight_decay``·‖W‖²/2).
    Returns the final cross-entropy per head. The backbone is run in eval mode and not changed.
    Under torch.distributed the statistics are summed and the features gathered over the ranks
    (module docstring): every rank fits the same heads."""
    from graphsel.pipeline.verify import eval_mode

    from .subgraph import extract

    heads = heads_of(gm)
    if not heads:
        return {}
    group = gd.resolve_group(process_group)
    what = "dcp.fit_heads"
    source = as_source(data, "dcp")
    nodes = {n.name: n for n in gm.graph.nodes}
    prefix = extract(gm, [], [nodes[h["pivot"]] for h in heads], model_inputs=True)
    modules = dict(gm.named_modules())
    param = next(iter(gm.parameters()))
    device, dtype = param.device, param.dtype

    def pivots():
        for inputs, targets in source:
            inputs, targets = to_device(inputs, targets, device, dtype)
            with torch.no_grad():
                outs = prefix(*inputs)
            yield [o.movedim(h["channel_dim"], 1) for o, h in zip(outs, heads)], targets

    with eval_mode(gm):
        # the one place statistics cross batches: per-channel sums, sums of squares, counts
        sums = [None] * len(heads)
        for outs, _ in pivots():
            for i, o in enumerate(outs):
                flat = o.transpose(0, 1).reshape(o.shape[1], -1).double()
                part = torch.stack([flat.sum(1), flat.pow(2).sum(1), torch.full_like(flat[:, 0], flat.shape[1])])
                sums[i] = part if sums[i] is None else sums[i] + part
        if group is not None:
            sums = [gd.all_reduce_sum(x, group, what=what) for x in sums]
        for h, s in zip(heads, sums):
            mean = s[0] / s[2]
            var = (s[1] / s[2] - mean.pow(2)).clamp_min(0)
            bn = modules[h["bn"]]
            with torch.no_grad():
                bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
                bn.running_var.copy_(var.to(bn.running_var.dtype))
                bn.weight.fill_(1)
                bn.bias.zero_()
        feats: list[list[torch.Tensor]] = [[] for _ in heads]
        labels = []
        with torch.no_grad():
            for outs, targets in pivots():
                for i, (o, h) in enumerate(zip(outs, heads)):
                    z = torch.relu(modules[h["bn"]](o))
                    feats[i].append(z.mean(tuple(range(2, z.dim()))))
                labels.append(targets)
    y = gd.all_gather_rows(torch.cat(labels), group, what=what)
    result = {}
    for i, h in enumerate(heads):
        fc = modules[h["fc"]]
        f = gd.all_gather_rows(torch.cat(feats[i]), group, what=what)
        opt = torch.optim.LBFGS(fc.parameters(), lr=1, max_iter=iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(fc(f), y) + 0.5 * weight_decay * fc.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            result[f"aux{h['index']}"] = float(F.cross_entropy(fc(f), y))
        for p in fc.parameters():
            p.grad = None
    return result
