"""Shared training code of the Fashion-MNIST method benchmarks (``sconv_*``, ``dgc_*``): not a benchmark.

* :func:`augment` — the papers' augmentation (random translation up to 4 pixels, horizontal flip);
* :func:`batches` — one epoch of shuffled mini-batches from a seeded generator (the same seed gives
  every arm of a paired comparison the same data order);
* :func:`cosine_lr` — the papers' cosine learning rate to 0, stepped per iteration;
* :func:`sgd_step`, :func:`train` — one SGD step, and a training loop with hooks before/after each
  step (schedules of the methods) and an extra loss (the methods' regularisers);
* :func:`evaluate` — test accuracy (eval mode, inference mode);
* :func:`count_params` — parameters.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


def augment(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random translation up to ``pad`` pixels (zero padding of the normalised image, as a padded crop)
    and random horizontal flip, per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), out.flip(3), out)


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, g: torch.Generator,
            drop_last: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of mini-batches in an order drawn from ``g`` (index slicing: no DataLoader overhead)."""
    order = torch.randperm(len(labels), generator=g)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        yield images[idx], labels[idx]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size


def cosine_lr(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine learning rate from the optimizer's lr to 0 over ``total_steps`` (step it per iteration)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             extra_loss: Callable[[], torch.Tensor] | None = None) -> tuple[float, torch.Tensor]:
    """Forward, cross-entropy (+ ``extra_loss()`` of that forward), backward, step; (loss, logits)."""
    out = model(x)
    loss = F.cross_entropy(out, y)
    if extra_loss is not None:
        loss = loss + extra_loss()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item(), out.detach()


def train(model: nn.Module, opt: torch.optim.Optimizer, train_set: tuple[torch.Tensor, torch.Tensor], *,
          epochs: int, batch_size: int, seed: int, augmentation: bool = True,
          before_step: Callable[[int], Any] | None = None, after_step: Callable[[int], Any] | None = None,
          extra_loss: Callable[[], torch.Tensor] | None = None, on_epoch_end: Callable[[int, dict], Any] | None = None,
          label: str = "", verbose: bool = True) -> dict:
    """Train ``model`` for ``epochs`` with a per-iteration cosine learning rate. Data order comes from a
    generator seeded with ``seed`` and augmentation from one seeded with ``seed + 1``, so runs with the same
    seed see the same batches. ``before_step(step)`` / ``after_step(step)`` run around each SGD step
    (0-based global step), ``on_epoch_end(epoch, entry)`` may add to the epoch's log entry.
    Returns ``{"log", "train_seconds", "steps"}``."""
    images, labels = train_set
    per_epoch = steps_per_epoch(len(labels), batch_size)
    total = epochs * per_epoch
    sched = cosine_lr(opt, total)
    order = torch.Generator().manual_seed(seed)
    aug = torch.Generator().manual_seed(seed + 1)
    log, step, t0 = [], 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        seen = correct = 0
        loss_sum = 0.0
        for x, y in batches(images, labels, batch_size, order):
            if augmentation:
                x = augment(x, aug)
            if before_step is not None:
                before_step(step)
            loss, out = sgd_step(model, opt, x, y, extra_loss)
            sched.step()
            if after_step is not None:
                after_step(step)
            step += 1
            seen += len(y)
            correct += int((out.argmax(1) == y).sum())
            loss_sum += loss * len(y)
        entry = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                 "seconds": time.perf_counter() - t0}
        if on_epoch_end is not None:
            on_epoch_end(epoch, entry)
        log.append(entry)
        if verbose:
            print(f"  [{label}] epoch {epoch + 1}/{epochs}: loss {entry['train_loss']:.3f}, train acc "
                  f"{entry['train_accuracy']:.4f} ({entry['seconds']:.0f} s)", flush=True)
    return {"log": log, "train_seconds": time.perf_counter() - t0, "steps": step}


def evaluate(model: nn.Module, test_set: tuple[torch.Tensor, torch.Tensor], batch_size: int = 500,
             per_batch: Callable[[nn.Module], Any] | None = None) -> float:
    """Test accuracy in eval and inference mode (``per_batch(model)`` runs after each batch)."""
    images, labels = test_set
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(labels), batch_size):
            out = model(images[i:i + batch_size])
            correct += int((out.argmax(1) == labels[i:i + batch_size]).sum())
            if per_batch is not None:
                per_batch(model)
    return correct / len(labels)


def loader_accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy of ``model`` in eval mode over a DataLoader of ``(inputs, targets)``."""
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a TensorDataset."""
    return dataset.tensors[0], dataset.tensors[1]
