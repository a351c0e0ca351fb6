"""Training with selective convolutions: optimizer parameter groups and the dealloc → realloc schedule.

    gm = graphsel.transform(model, ["insert_selective_conv"], example_inputs=x)
    opt = torch.optim.SGD(param_groups(gm), lr=0.1, momentum=0.9, nesterov=True)
    sched = SelectiveSchedule(gm, epochs, optimizer=opt)
    for epoch in range(epochs):
        train_one_epoch(gm, opt)
        sched.on_epoch_end(epoch)          # dealloc → realloc during the first half of training

The paper's recipe (000, B.1): SGD with Nesterov momentum 0.9, cosine learning rate from 0.1,
weight decay 1e-4 except the spatial shifts (1e-5), dealloc and realloc at the end of every epoch
for the first half of the epochs. Passing the optimizer lets the schedule reset its per-parameter
state (momentum, Adam moments) for the slots it re-initialises, so a re-allocated slot starts
from its zeroed weights instead of being pushed by the old slot's momentum, and register a bias
created by mean compensation.

Under torch.distributed (torchrun, DistributedDataParallel) nothing changes in this loop: the
schedule uses the default process group (``process_group=`` picks another), and dealloc's choices
and realloc's random sources and shifts are rank 0's, broadcast, so every replica is rewired the
same way whatever ``seed``. Build the schedule on the module (``ddp.module``) and call
:meth:`~SelectiveSchedule.on_epoch_end` on every rank. With ``compensate=True`` or
``train_shifts=False`` build it before wrapping the model in DDP (DDP fixes at construction which
parameters it averages: the biases must exist, the frozen shifts must be frozen), or re-wrap
afterwards with :func:`graphsel.distributed.rewrap`; given the DDP wrapper itself, it refuses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from graphsel.errors import DistributedError

from .ecdm import DeallocReport, ReallocReport, _ensure_bias, dealloc_layer, realloc_layer
from .module import SelectiveConv2d, selective_modules


def param_groups(model: nn.Module, weight_decay: float = 1e-4, shift_weight_decay: float = 1e-5) -> list[dict]:
    """Optimizer parameter groups: every trainable parameter at ``weight_decay`` except the selective
    convs' spatial shifts at ``shift_weight_decay``."""
    shift_ids = {id(m.shift) for _, m in selective_modules(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in shift_ids], "weight_decay": weight_decay}]
    shifts = [p for p in params if id(p) in shift_ids]
    if shifts:
        groups.append({"params": shifts, "weight_decay": shift_weight_decay})
    return groups


def reset_optimizer_slots(optimizer: torch.optim.Optimizer, module: SelectiveConv2d, slots: list[int]) -> None:
    """Zero the optimizer state (momentum buffers, moments) of the conv columns, BN entries and shifts
    of ``slots``."""
    if not slots:
        return
    idx = torch.tensor(slots, dtype=torch.long)
    per_param = [(module.conv.weight, 1), (module.bn.weight, 0), (module.bn.bias, 0), (module.shift, 0)]
    for p, dim in per_param:
        if p is None or p not in optimizer.state:
            continue
        for value in optimizer.state[p].values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                value.index_fill_(dim, idx.to(value.device), 0)


def _register_new_bias(optimizer: torch.optim.Optimizer, module: SelectiveConv2d) -> None:
    bias = module.conv.bias
    if bias is None or any(bias is p for g in optimizer.param_groups for p in g["params"]):
        return
    group = next((g for g in optimizer.param_groups if any(module.conv.weight is p for p in g["params"])),
                 optimizer.param_groups[0])
    optimizer.add_param_group({k: v for k, v in group.items() if k != "params"} | {"params": [bias]})


def _refuse_under_ddp(model: nn.Module, change: str) -> None:
    """DDP fixes at construction which parameters it averages: a change to them inside a wrapper
    built before would leave gradients unaveraged (or DDP waiting for them)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise DistributedError(
            f"SelectiveSchedule: {change} inside a DistributedDataParallel wrapper that was built before: DDP "
            f"fixes at construction which parameters it averages, so the replicas would drift apart (or DDP "
            f"would wait for gradients that never come). Build the schedule before wrapping the model in DDP, or "
            f"build it on ddp.module and then ddp = graphsel.distributed.rewrap(ddp, optimizer, rebuild=True).model "
            f"on every rank", collective="SelectiveSchedule")


@dataclass
class LayerAllocation:
    """Slots of one layer after an epoch: ``open`` (reading their own channel), ``copies`` (open, reading a
    shifted copy), ``closed``; plus what this epoch's dealloc closed and realloc re-opened, and
    ``recycled``: how many of the closed ones were copies made by an earlier call (churn)."""
    path: str
    slots: int
    own: int
    copies: int
    closed: int
    deallocated: int = 0
    reallocated: int = 0
    recycled: int = 0


@dataclass
class EpochRecord:
    epoch: int
    layers: list[LayerAllocation] = field(default_factory=list)

    @property
    def deallocated(self) -> int:
        return sum(layer.deallocated for layer in self.layers)

    @property
    def reallocated(self) -> int:
        return sum(layer.reallocated for layer in self.layers)

    @property
    def recycled(self) -> int:
        return sum(layer.recycled for layer in self.layers)


def allocation(model: nn.Module) -> list[LayerAllocation]:
    """The current slot allocation of every selective conv of ``model``."""
    out = []
    for path, m in selective_modules(model):
        is_open = m.is_open > 0
        copies = int((is_open & (m.source >= 0)).sum())
        n_open = int(is_open.sum())
        out.append(LayerAllocation(path, m.in_channels, n_open - copies, copies, m.in_channels - n_open))
    return out


class SelectiveSchedule:
    """Call :meth:`on_epoch_end` after each training epoch: during the first ``fraction`` of the ``epochs``
    it runs dealloc then realloc on every selective conv of ``model`` (see the module docstring).

    ``compensate``: dealloc adds the expected contribution of closed slots to the conv biases (creating
    them now, so the optimizer can be built afterwards; with ``optimizer`` they are also registered).
    ``seed``: the generator of realloc's choices and shifts. ``realloc=False``: dealloc only (the
    ablation; closed slots stay closed). ``train_shifts=False``: the shifts are frozen (their
    ``requires_grad`` is switched off now; an optimizer skips parameters without gradients, so it
    may be built before or after). ``history``: one :class:`EpochRecord` per active epoch;
    ``totals[path]``: slots ever deallocated / reallocated / recycled per layer. ``process_group``:
    the torch.distributed group whose rank 0 decides (default: the default group when initialised;
    see the module docstring)."""

    def __init__(self, model: nn.Module, epochs: int, *, fraction: float = 0.5, compensate: bool = False,
                 optimizer: torch.optim.Optimizer | None = None, seed: int | None = 0, realloc: bool = True,
                 train_shifts: bool = True, process_group=None):
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
        self.layers = selective_modules(model)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} holds no SelectiveConv2d: run "
                             f"graphsel.transform(model, ['insert_selective_conv']) first")
        self.model, self.epochs, self.fraction = model, epochs, fraction
        self.compensate, self.optimizer = compensate, optimizer
        self.process_group = process_group
        self.realloc, self.train_shifts = bool(realloc), bool(train_shifts)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.history: list[EpochRecord] = []
        self.totals: dict[str, dict[str, int]] = {p: {"deallocated": 0, "reallocated": 0, "recycled": 0}
                                                  for p, _ in self.layers}
        if not self.train_shifts:
            if any(m.shift.requires_grad for _, m in self.layers):
                _refuse_under_ddp(model, "train_shifts=False stops the shifts' gradients")
            for _, m in self.layers:
                m.shift.requires_grad_(False)
        if compensate:
            missing = [path for path, m in self.layers if m.conv.bias is None]
            if missing:
                _refuse_under_ddp(model, f"compensate=True gives {len(missing)} convolution(s) a new bias "
                                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
            for _, m in self.layers:
                _ensure_bias(m.conv)
                if optimizer is not None:
                    _register_new_bias(optimizer, m)

    @property
    def variant(self) -> str:
        """``"full"``, ``"dealloc_only"``, ``"shifts_frozen"`` or ``"dealloc_only+shifts_frozen"``."""
        parts = ([] if self.realloc else ["dealloc_only"]) + ([] if self.train_shifts else ["shifts_frozen"])
        return "+".join(parts) or "full"

    def active(self, epoch: int) -> bool:
        """Whether dealloc/realloc run at the end of ``epoch`` (0-based)."""
        return epoch < self.fraction * self.epochs

    def on_epoch_end(self, epoch: int) -> EpochRecord | None:
        if not self.active(epoch):
            return None
        record = EpochRecord(epoch)
        for path, m in self.layers:
            copies_before = set(torch.nonzero((m.is_open > 0) & (m.source >= 0)).flatten().tolist())
            d: DeallocReport = dealloc_layer(m, compensate=self.compensate, path=path,
                                             process_group=self.process_group)
            r = realloc_layer(m, generator=self.generator, path=path, process_group=self.process_group) \
                if self.realloc else ReallocReport(path)
            if self.optimizer is not None:
                reset_optimizer_slots(self.optimizer, m, [slot for slot, _, _ in r.reallocated])
            recycled = len(copies_before.intersection(d.closed))
            self.totals[path]["deallocated"] += len(d.closed)
            self.totals[path]["reallocated"] += len(r.reallocated)
            self.totals[path]["recycled"] += recycled
            now = allocation(m)[0]
            now.path = path
            now.deallocated, now.reallocated, now.recycled = len(d.closed), len(r.reallocated), recycled
            record.layers.append(now)
        self.history.append(record)
        return record

    def state_dict(self) -> dict:
        return {"history": self.history, "totals": self.totals,
                "generator": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.totals = state["history"], state["totals"]
        for totals in self.totals.values():          # schedules saved before churn was counted
            totals.setdefault("recycled", 0)
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])
