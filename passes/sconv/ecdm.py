"""Expected channel damage (ECDM) and the two re-wiring operations, dealloc and realloc (methods.md §1).

Model (paper 000, eq. 1–3): the BN output of input channel i is N(β_i, γ_i²) at every pixel, so
its post-ReLU mean is ``E_i = |γ_i| φ(β_i/|γ_i|) + β_i Φ(β_i/|γ_i|)`` (→ max(β_i, 0) as
|γ_i| → 0), and removing slot i changes the spatial mean of output channel j by
``ECDM[j, i] = E_i · Σ_k W[j, i, k]`` (the paper's "same padding" assumption: every output pixel
sees the whole kernel). Closed slots have E_i = 0.

* :func:`dealloc` closes, per layer, the longest prefix of slots (sorted by their worst
  normalised damage) whose accumulated normalised damage stays ≤ γ for every output channel.
  Approximate: under the model the mean of output channel j moves by ``Σ_closed ECDM[j, i]``,
  at most ``bound_j = Σ_closed |ECDM[j, i]| ≤ γ · Σ_i |ECDM[j, i]|`` (both reported). With
  ``compensate=True`` the expected contribution of the closed slots is added to the conv's
  bias, so the expected change is zero under the model. Open slots are never touched, and the
  last open slot of a layer is never closed.
* :func:`realloc` (layers with K > 0) re-opens every closed slot as a shifted copy of one of the
  K best open slots (score ``‖n[:, i]‖₂``), with zeroed conv columns: exactly function-preserving.

Under torch.distributed (``process_group``, default: the default group when initialised; see
:mod:`graphsel.distributed`) the decisions are rank 0's, broadcast: the slots dealloc closes, and
realloc's random sources and shifts, drawn from rank 0's generator. Every rank then applies the
same edits to its (identical) replica.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from graphsel import distributed as gd
from graphsel.analysis.activations import relu_gaussian_mean
from graphsel.errors import DistributedError

from .module import SelectiveConv2d, selective_modules

SHIFT_INIT_RANGE = 1.5  # re-allocated copies get a shift drawn from U(−1.5, 1.5)² pixels


def expected_activation(bn: nn.BatchNorm2d) -> torch.Tensor:
    """``E_i``: the mean of ReLU(N(β_i, γ_i²)) per channel (float64), from the BN's affine parameters."""
    c = bn.num_features
    dev = bn.running_mean.device if bn.running_mean is not None else (bn.weight.device if bn.weight is not None else "cpu")
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(c, dtype=torch.float64, device=dev)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(c, dtype=torch.float64, device=dev)
    return relu_gaussian_mean(beta, gamma)


def ecdm(module: SelectiveConv2d, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The expected channel damage matrix ``ECDM[j, i] = E_i · is_open_i · Σ_k W[j, i, k]`` (C_out × C_in).

    Returned in the conv weight's dtype unless ``dtype`` is given (dealloc/realloc use float64)."""
    _check_module(module)
    e = expected_activation(module.bn) * module.is_open.detach().double()
    wsum = module.conv.weight.detach().double().sum(dim=(2, 3))
    out = wsum * e.unsqueeze(0)
    return out.to(dtype or module.conv.weight.dtype)


def normalized_ecdm(module: SelectiveConv2d) -> torch.Tensor:
    """``n[j, i] = |ECDM[j, i]| / Σ_i' |ECDM[j, i']|`` (float64; rows that are all zero stay zero)."""
    a = ecdm(module, dtype=torch.float64).abs()
    total = a.sum(dim=1, keepdim=True)
    return torch.where(total > 0, a / total.clamp_min(1e-300), torch.zeros_like(a))


@dataclass
class DeallocReport:
    """What :func:`dealloc` did to one layer.

    ``damage``: worst normalised accumulated damage of the closed slots (≤ γ);
    ``expected_change[j]``: predicted change of the spatial mean of output channel j (0 when
    compensated); ``bound[j] = Σ_closed |ECDM[j, i]|``: the bound on that change under the model."""
    path: str
    closed: list[int]
    damage: float
    expected_change: torch.Tensor
    bound: torch.Tensor
    compensated: bool = False
    open_before: int = 0
    open_after: int = 0


@dataclass
class ReallocReport:
    """What :func:`realloc` did to one layer: ``(slot, source channel, copied slot)`` per re-opened slot,
    and the slots that stayed closed because every candidate reached ``n_max`` copies."""
    path: str
    reallocated: list[tuple[int, int, int]] = field(default_factory=list)
    left_closed: list[int] = field(default_factory=list)


def _check_module(module) -> None:
    if not isinstance(module, SelectiveConv2d):
        raise TypeError(f"expected a SelectiveConv2d, got {type(module).__name__}; run the "
                        f"'insert_selective_conv' pass to get selective convolutions")


def _targets(model_or_module: nn.Module) -> list[tuple[str, SelectiveConv2d]]:
    if isinstance(model_or_module, SelectiveConv2d):
        return [("", model_or_module)]
    if not isinstance(model_or_module, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model_or_module).__name__}")
    found = selective_modules(model_or_module)
    if not found:
        raise ValueError(f"{type(model_or_module).__name__} holds no SelectiveConv2d: run "
                         f"graphsel.transform(model, ['insert_selective_conv']) first")
    return found


def _check_full(module: SelectiveConv2d, what: str, path: str) -> None:
    if gd.is_sharded(module.conv.weight) or gd.is_sharded(module.shift):
        raise DistributedError(f"{what} of '{path}': the layer's parameters are sharded (FSDP2 fully_shard); "
                               f"rewiring edits whole weight columns. Rewire the model before sharding it, or "
                               f"train it with DistributedDataParallel", collective=what)


def _ensure_bias(conv: nn.Conv2d) -> None:
    if conv.bias is None:
        w = conv.weight
        conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=w.dtype, device=w.device))


@torch.no_grad()
def dealloc_layer(module: SelectiveConv2d, *, compensate: bool = False, gamma: float | None = None,
                  path: str = "", process_group=None) -> DeallocReport:
    """dealloc on one layer (see the module docstring); under torch.distributed the slots closed
    are rank 0's choice."""
    _check_module(module)
    _check_full(module, "dealloc", path)
    group = gd.resolve_group(process_group)
    gamma = module.gamma if gamma is None else float(gamma)
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    n = normalized_ecdm(module)
    full = ecdm(module, dtype=torch.float64)
    open_idx = torch.nonzero(module.is_open > 0).flatten()
    n_open = open_idx.numel()
    worst = n.max(dim=0).values if n.shape[0] else torch.zeros(n.shape[1], dtype=torch.float64)
    order = open_idx[torch.argsort(worst[open_idx], stable=True)]
    accumulated = torch.cumsum(n[:, order], dim=1).max(dim=0).values if n.shape[0] else torch.zeros(len(order))
    count = int((accumulated <= gamma).sum())  # accumulated damage only grows: a prefix
    count = min(count, max(n_open - 1, 0))
    closed = order[:count]
    damage = float(accumulated[count - 1]) if count else 0.0
    if group is not None:
        chosen, damage = gd.broadcast_object((closed.tolist(), damage), group, what=f"dealloc of '{path}'")
        closed = torch.tensor(chosen, dtype=torch.long, device=order.device)
        count = len(chosen)
    change = full[:, closed].sum(dim=1)
    bound = full[:, closed].abs().sum(dim=1)
    if count:
        if compensate:
            _ensure_bias(module.conv)
            module.conv.bias.add_(change.to(module.conv.bias.dtype))
        module.is_open[closed] = 0
        module.source[closed] = -1
        module.sync()
    return DeallocReport(path, sorted(closed.tolist()), damage,
                         torch.zeros_like(change) if compensate else change, bound, compensate and count > 0,
                         n_open, n_open - count)


@torch.no_grad()
def realloc_layer(module: SelectiveConv2d, *, generator: torch.Generator | None = None,
                  path: str = "", process_group=None) -> ReallocReport:
    """realloc on one layer (see the module docstring); a no-op for K = 0. Under torch.distributed
    the sources and shifts are drawn on rank 0 (from its ``generator``) and broadcast."""
    _check_module(module)
    _check_full(module, "realloc", path)
    group = gd.resolve_group(process_group)
    plan = _realloc_plan(module, generator) if gd.rank(group) == 0 else None
    plan = gd.broadcast_object(plan, group, what=f"realloc of '{path}'")
    report = ReallocReport(path, left_closed=plan["left_closed"])
    if not plan["copies"]:
        return report
    bn, conv = module.bn, module.conv
    for slot, r, pick, draw in plan["copies"]:
        conv.weight[:, slot] = 0
        if bn.weight is not None:
            bn.weight[slot] = bn.weight[pick]
        if bn.bias is not None:
            bn.bias[slot] = bn.bias[pick]
        if bn.running_mean is not None:
            bn.running_mean[slot] = bn.running_mean[pick]
            bn.running_var[slot] = bn.running_var[pick]
        module.shift[slot] = torch.tensor(draw, dtype=torch.float64).to(module.shift.dtype).to(module.shift.device)
        module.source[slot] = r
        module.is_open[slot] = 1
        report.reallocated.append((slot, r, pick))
    module.sync()
    return report


def _realloc_plan(module: SelectiveConv2d, generator: torch.Generator | None) -> dict:
    """realloc's choices, without changing the module: ``copies`` (slot, source channel, copied slot,
    shift) per re-opened slot and the slots ``left_closed`` (every candidate at ``n_max`` copies)."""
    plan = {"copies": [], "left_closed": []}
    closed = module.closed_slots()
    if module.K <= 0 or not closed:
        return plan
    score = normalized_ecdm(module).norm(dim=0)
    open_slots = module.open_slots()
    if not open_slots:
        plan["left_closed"] = closed
        return plan
    source = module.source

    def root(slot: int) -> int:
        s = int(source[slot])
        return s if s >= 0 else slot

    copies: dict[int, int] = {}
    for s in open_slots:
        if int(source[s]) >= 0:
            copies[root(s)] = copies.get(root(s), 0) + 1
    ranked = sorted(open_slots, key=lambda s: (-float(score[s]), s))
    for slot in closed:
        eligible = [s for s in ranked if module.n_max is None or copies.get(root(s), 0) < module.n_max]
        candidates = eligible[:module.K]
        if not candidates:
            plan["left_closed"].append(slot)
            continue
        pick = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
        r = root(pick)
        draw = torch.rand(2, generator=generator, dtype=torch.float64) * (2 * SHIFT_INIT_RANGE) - SHIFT_INIT_RANGE
        copies[r] = copies.get(r, 0) + 1
        plan["copies"].append((slot, r, pick, draw.tolist()))
    return plan


def dealloc(model_or_module: nn.Module, compensate: bool = False, *, gamma: float | None = None,
            process_group=None):
    """Run dealloc on a :class:`SelectiveConv2d` (returns its :class:`DeallocReport`) or on every one in a
    model (returns ``{path: DeallocReport}``). ``gamma`` overrides each layer's own threshold;
    ``process_group``: see the module docstring."""
    targets = _targets(model_or_module)
    reports = {p: dealloc_layer(m, compensate=compensate, gamma=gamma, path=p, process_group=process_group)
               for p, m in targets}
    return reports[""] if isinstance(model_or_module, SelectiveConv2d) else reports


def realloc(model_or_module: nn.Module, *, generator: torch.Generator | None = None, process_group=None):
    """Run realloc on a :class:`SelectiveConv2d` (returns its :class:`ReallocReport`) or on every one in a
    model (returns ``{path: ReallocReport}``). Exactly function-preserving. ``process_group``: see the
    module docstring."""
    targets = _targets(model_or_module)
    reports = {p: realloc_layer(m, generator=generator, path=p, process_group=process_group) for p, m in targets}
    return reports[""] if isinstance(model_or_module, SelectiveConv2d) else reports
