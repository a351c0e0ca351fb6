"""torch.distributed for graphsel's training-time helpers: the process group, the few collectives
the methods need, their errors, and two helpers for a user's training loop.

Every method helper that makes a decision during training (SConv's ``dealloc``, ``realloc`` and
``SelectiveSchedule``; DGC's ``calibrate_global_threshold`` and ``DGCTraining``; DCP's selection,
head fitting and ``finetune``; BSN's ``BudgetedTrainer``) takes ``process_group=None``, which
:func:`resolve_group` turns into the group to use:

* a group given explicitly: that group;
* ``None`` with torch.distributed initialised (``torchrun``, ``init_process_group``): the default
  group, so a training script becomes correct under torchrun without changes;
* ``None`` otherwise, or inside ``with graphsel.distributed.local():``: no group. Every
  collective here then returns its input, and single-process results are unchanged bit for bit.

How the methods use them: sums and counts are all-reduced, rows are all-gathered, random
choices are made on the group's rank 0 and broadcast, and order statistics of values spread over
the ranks are found by counting (:func:`order_statistics`: exact, and no rank holds more than its
own values).

A collective that fails — a peer that died (gloo: "Connection reset by peer") or no answer within
the timeout given to ``init_process_group`` — raises :class:`~graphsel.errors.DistributedError`
naming what graphsel was doing, the collective and the rank, instead of torch's bare RuntimeError.

For training loops: :func:`assert_replicas_equal` (every rank holds bit-identical parameters and
buffers; names the first that differs), :func:`rewrap` (what a ``DistributedDataParallel``
wrapper needs after its module was rewired in place) and :func:`sync_buffers` (rank 0's buffers
on every rank, for FSDP2 or a hand-made loop).
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from graphsel.errors import DistributedError, ReplicaMismatchError

_LOCAL = contextvars.ContextVar("graphsel_distributed_local", default=False)


# -- the group -------------------------------------------------------------------------------

def initialized() -> bool:
    """Whether torch.distributed is available and initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def resolve_group(process_group: Any = None) -> Any:
    """The group a helper uses (module docstring): ``process_group`` when given, else the default
    group when torch.distributed is initialised (and not inside :func:`local`), else ``None``."""
    if process_group is not None:
        if not initialized():
            raise DistributedError("a process_group was given but torch.distributed is not initialised in this "
                                   "process: call torch.distributed.init_process_group(...) first (torchrun sets "
                                   "the environment it needs)", collective="resolve_group")
        return process_group
    if _LOCAL.get() or not initialized():
        return None
    return dist.group.WORLD


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Inside, helpers called without ``process_group`` run as one process even when torch.distributed
    is initialised: for work that only some ranks do (rank 0 rewiring or evaluating a copy alone),
    which would otherwise wait for the others in a collective until the timeout."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def rank(group: Any) -> int:
    """This process's rank in ``group`` (0 without a group)."""
    return 0 if group is None else dist.get_rank(group)


def world_size(group: Any) -> int:
    """Processes in ``group`` (1 without a group)."""
    return 1 if group is None else dist.get_world_size(group)


def _root(group: Any) -> int:
    """The global rank of the group's rank 0 (broadcast sources are global ranks)."""
    return dist.get_global_rank(group, 0)


def _device(group: Any) -> torch.device:
    # NCCL takes CUDA tensors only; gloo (and a "cpu:gloo,cuda:nccl" group) takes CPU tensors
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- errors ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _collective(what: str, op: str, group: Any) -> Iterator[None]:
    """Turn the RuntimeError (DistBackendError) of a failed collective into a DistributedError."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:
        raise _error(what, op, group, e) from e


def _error(what: str, op: str, group: Any, e: BaseException) -> DistributedError:
    r, w = rank(group), world_size(group)
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    low = text.lower()
    if "timed out" in low or "timeout" in low:
        cause = "a peer did not answer within the process group's timeout (it is stuck, or not running this call)"
    elif "reset by peer" in low or "closed" in low or "connection" in low or "broken pipe" in low:
        cause = "a peer closed its connection (it exited or crashed)"
    else:
        cause = "the collective failed"
    return DistributedError(
        f"{what}: {op} failed on rank {r} of {w}: {cause}. torch.distributed said: {text}\n"
        f"  fix: read the other ranks' logs for their first error; every rank must make the same graphsel calls "
        f"in the same order (the same number of batches and steps). The timeout is the one given to "
        f"torch.distributed.init_process_group(timeout=...).", collective=op, rank=r, world_size=w)


# -- collectives (identities without a group) ------------------------------------------------

def broadcast_object(obj: Any, group: Any, *, what: str) -> Any:
    """Rank 0's ``obj`` (pickled) on every rank."""
    if group is None:
        return obj
    box = [obj]
    with _collective(what, "broadcast_object_list from rank 0", group):
        dist.broadcast_object_list(box, src=_root(group), group=group)
    return box[0]


def all_gather_object(obj: Any, group: Any, *, what: str) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if group is None:
        return [obj]
    out: list[Any] = [None] * world_size(group)
    with _collective(what, "all_gather_object", group):
        dist.all_gather_object(out, obj, group=group)
    return out


def all_reduce_sum(tensor: torch.Tensor, group: Any, *, what: str) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over the group (a new tensor on its device; ``tensor``
    itself without a group). Every rank receives the same bits."""
    if group is None:
        return tensor
    t = tensor.detach().to(_device(group), copy=True).contiguous()
    with _collective(what, "all_reduce", group):
        dist.all_reduce(t, group=group)
    return t.to(tensor.device)


def sum_over(values: Sequence[float], group: Any, *, what: str) -> list[float]:
    """Python numbers summed over the group (in float64)."""
    if group is None:
        return [float(v) for v in values]
    return all_reduce_sum(torch.tensor([float(v) for v in values], dtype=torch.float64), group, what=what).tolist()


def all_gather_rows(tensor: torch.Tensor, group: Any, *, what: str) -> torch.Tensor:
    """The rows (dimension 0) of ``tensor`` from every rank, concatenated in rank order; the ranks
    may hold different numbers of rows (sizes are gathered first, rows padded to the longest)."""
    if group is None:
        return tensor
    if not 1 <= tensor.dim() <= 8:
        raise ValueError(f"all_gather_rows: tensors of 1 to 8 dimensions, got {tensor.dim()}")
    dev, w = _device(group), world_size(group)
    shape = torch.tensor([tensor.dim(), *tensor.shape, *([0] * (8 - tensor.dim()))], dtype=torch.int64, device=dev)
    shapes = [torch.empty_like(shape) for _ in range(w)]
    with _collective(what, "all_gather of row counts", group):
        dist.all_gather(shapes, shape, group=group)
    shapes = [s.tolist() for s in shapes]
    for r, s in enumerate(shapes):
        trailing = tuple(s[2:1 + s[0]])
        if trailing != tuple(tensor.shape[1:]):
            raise DistributedError(f"{what}: rank {r} holds rows of shape {trailing} but rank {rank(group)} holds "
                                   f"{tuple(tensor.shape[1:])}; every rank must give tensors of the same shape but "
                                   f"for the number of rows", collective="all_gather", rank=rank(group), world_size=w)
    counts = [s[1] for s in shapes]
    padded = tensor.detach().new_zeros((max(counts), *tensor.shape[1:]), device=dev)
    padded[:tensor.shape[0]] = tensor.detach().to(dev)
    parts = [torch.empty_like(padded) for _ in range(w)]
    with _collective(what, "all_gather", group):
        dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(tensor.device)


@torch.no_grad()
def broadcast_tensors(tensors: Sequence[torch.Tensor], group: Any, *, what: str) -> None:
    """Overwrite ``tensors`` (parameters, buffers) with rank 0's values, in place."""
    if group is None:
        return
    dev = _device(group)
    with _collective(what, "broadcast from rank 0", group):
        for t in tensors:
            buf = t.detach() if t.device == dev and t.is_contiguous() else t.detach().to(dev).contiguous()
            dist.broadcast(buf, src=_root(group), group=group)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)


def same_on_all_ranks(value: Any, group: Any, *, what: str, name: str, fix: str) -> None:
    """Raise a DistributedError on every rank unless every rank gives the same ``value``."""
    if group is None:
        return
    values = all_gather_object(value, group, what=what)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        raise DistributedError(f"{what}: the ranks disagree on {name} ({shown}); {fix}", collective="all_gather_object",
                               rank=rank(group), world_size=len(values))


def order_statistics(values: torch.Tensor, positions: Sequence[int], group: Any, *, what: str) -> list[float]:
    """The elements at the 0-based ``positions`` of the sorted union over the group of every rank's
    ``values`` (non-negative float32), exactly: a bisection on the floats' bit patterns (their order
    as integers is their order as numbers), 31 all-reduces of ``len(positions)`` counts. No rank
    gathers the others' values. NaN counts as the largest value, as in ``torch.sort``."""
    bits = values.detach().to(torch.float32).contiguous().view(torch.int32).reshape(-1)
    if bool((bits < 0).any()):
        raise ValueError(f"{what}: order_statistics needs non-negative values (e.g. |g|)")
    need = torch.tensor([int(p) + 1 for p in positions], dtype=torch.int64)
    lo = torch.zeros(len(need), dtype=torch.int64)
    hi = torch.full((len(need),), 0x7FFFFFFF, dtype=torch.int64)
    while bool((lo < hi).any()):          # the same on every rank: the counts are all-reduced
        mid = (lo + hi) // 2
        counts = torch.stack([(bits <= int(m)).sum() for m in mid.tolist()]).to(torch.int64).cpu()
        counts = all_reduce_sum(counts, group, what=what)
        enough = counts >= need
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid + 1)
    return lo.to(torch.int32).view(torch.float32).tolist()


# -- models ----------------------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel, FSDP (v1) and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or \
                type(model).__name__ == "FullyShardedDataParallel":
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2's ``fully_shard`` makes parameters DTensors)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(tensor, DTensor)


def sync_buffers(model: nn.Module, group: Any = None) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics, rewiring state), as DDP does before
    each forward: for FSDP2 (which leaves buffers to each rank) or a hand-made loop, before an
    evaluation or a checkpoint. Without a group it does nothing."""
    g = resolve_group(group)
    broadcast_tensors([b for b in unwrap(model).buffers() if not is_sharded(b)], g, what="sync_buffers")


def _digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


def _entries(module: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    out = [("parameter", n, p) for n, p in module.named_parameters()]
    out += [("buffer", n, b) for n, b in module.named_buffers()]
    # sharded tensors are not replicas (each rank holds its shard); meta tensors hold no values
    return [(k, n, t) for k, n, t in out if not is_sharded(t) and not t.is_meta]


def _ddp_problem(model: nn.Module) -> str | None:
    """What a DistributedDataParallel wrapper does not know of its module's parameters (None: nothing)."""
    known = getattr(model, "_module_parameters", None)
    if not isinstance(model, nn.parallel.DistributedDataParallel) or known is None:
        return None
    ids = {id(p) for p in known}
    current = [(n, p) for n, p in model.module.named_parameters() if n not in model.parameters_to_ignore]
    unknown = [n for n, p in current if id(p) not in ids]
    gone = len(ids - {id(p) for _, p in current})
    if not unknown and not gone:
        return None
    parts = ([f"{len(unknown)} parameter(s) it was not built with ({', '.join(unknown[:5])}"
              f"{', ...' if len(unknown) > 5 else ''})"] if unknown else []) + \
        ([f"{gone} parameter(s) it was built with are no longer in the module"] if gone else [])
    return (f"the DistributedDataParallel wrapper is stale: {'; '.join(parts)}. DDP does not average the "
            f"gradients of parameters it does not know, so the replicas drift apart. Fix: after rewiring, "
            f"ddp = graphsel.distributed.rewrap(ddp, optimizer).model on every rank")


def assert_replicas_equal(model: nn.Module, group: Any = None, *, buffers: bool | None = None) -> None:
    """Check that every rank holds bit-identical parameters and buffers (names, dtypes, shapes and
    values) in ``model`` (a module, or one wrapped by DDP, FSDP or torch.compile; sharded FSDP2
    parameters are skipped, each rank holding its own shard). For a DDP wrapper, also that it knows
    every parameter of its module. Without a group (see :func:`resolve_group`) it checks nothing.

    ``buffers``: compare buffers too. The default (None) compares them, except through a DDP wrapper
    that broadcasts rank 0's buffers at every forward: between two forwards its ranks hold the
    BatchNorm statistics of their own last batch, and the next forward replaces them by rank 0's.
    (Pass the module, ``ddp.module``, after an eval forward through the wrapper to compare them.)

    Raises :class:`~graphsel.errors.ReplicaMismatchError` on every rank, naming the first parameter
    or buffer (in rank 0's order) that differs, the ranks whose value differs and by how much."""
    g = resolve_group(group)
    if g is None:
        return
    what = "assert_replicas_equal"
    module = unwrap(model)
    if buffers is None:
        buffers = not (isinstance(model, nn.parallel.DistributedDataParallel) and
                       getattr(model, "forward_sync_buffers", getattr(model, "broadcast_buffers", False)))
    entries = [e for e in _entries(module) if buffers or e[0] == "parameter"]
    mine = [(kind, name, str(t.dtype), tuple(t.shape), _digest(t)) for kind, name, t in entries]
    everyone = all_gather_object((mine, _ddp_problem(model)), g, what=what)
    me, w = rank(g), len(everyone)
    stale = next((p for _, p in everyone if p), None)
    if stale:
        raise DistributedError(f"{what}: {stale}", collective=what, rank=me, world_size=w)
    reference = everyone[0][0]
    for r, (theirs, _) in enumerate(everyone[1:], 1):
        names0, names = [e[1] for e in reference], [e[1] for e in theirs]
        if names0 != names:
            missing = next((n for n in names0 if n not in set(names)), None)
            extra = next((n for n in names if n not in set(names0)), None)
            detail = (f"rank 0 has '{missing}', rank {r} does not" if missing else
                      f"rank {r} has '{extra}', rank 0 does not" if extra else "they are in another order")
            raise ReplicaMismatchError(f"{what}: the replicas hold different parameters and buffers: {detail}. "
                                       f"The ranks rewired the model differently (a pass run on some ranks only?)",
                                       name=missing or extra or "", ranks=[r], rank=me, world_size=w)
    first = next((i for i, e in enumerate(reference) if any(t[i] != e for t, _ in everyone[1:])), None)
    if first is None:
        return
    kind, name, dtype, shape, _ = reference[first]
    ranks = [r for r, (t, _) in enumerate(everyone) if t[first] != reference[first]]
    n_diff = sum(1 for i in range(len(reference)) if any(t[i] != reference[i] for t, _ in everyone[1:]))
    if all(everyone[r][0][first][2:4] == (dtype, shape) for r in ranks):
        tensor = entries[first][2]
        theirs = tensor.detach().clone()
        broadcast_tensors([theirs], g, what=what)
        gap = (tensor.detach().double() - theirs.double()).abs().max().item() if tensor.numel() and \
            (tensor.is_floating_point() or tensor.is_complex()) else float(not torch.equal(tensor, theirs))
        gaps = all_gather_object(gap, g, what=what)
        how = ", ".join(f"rank {r}: max |difference| {gaps[r]:.3g}" for r in ranks)
    else:
        how = ", ".join(f"rank {r}: {everyone[r][0][first][2]} {everyone[r][0][first][3]}" for r in ranks)
    raise ReplicaMismatchError(
        f"{what}: {kind} '{name}' ({dtype}, shape {tuple(shape)}) differs from rank 0's on {how}; {n_diff} of "
        f"{len(reference)} parameters and buffers differ. The ranks trained or rewired differently: call graphsel's "
        f"training helpers on every rank (they use the default process group), and after a rewiring that adds "
        f"parameters re-wrap DDP with graphsel.distributed.rewrap", name=name, ranks=ranks, rank=me, world_size=w)


# -- DistributedDataParallel after a rewiring --------------------------------------------------

@dataclass
class Rewrap:
    """What :func:`rewrap` did. ``model``: the wrapper to use from now on (the same object when
    ``rebuilt`` is False); ``added``: parameters the old wrapper did not know; ``dropped``: how many
    of its parameters were no longer in the module; ``optimizer``: what was done to the optimizer."""
    model: nn.parallel.DistributedDataParallel
    rebuilt: bool
    added: list[str] = field(default_factory=list)
    dropped: int = 0
    optimizer: list[str] = field(default_factory=list)


def _settings(ddp: nn.parallel.DistributedDataParallel) -> dict[str, Any]:
    """The constructor arguments ``ddp`` was built with (as far as it keeps them)."""
    accepted = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    kw = {"device_ids": getattr(ddp, "device_ids", None), "output_device": getattr(ddp, "output_device", None),
          "dim": ddp.dim, "process_group": ddp.process_group, "bucket_cap_mb": ddp.bucket_bytes_cap / 2 ** 20,
          "find_unused_parameters": ddp.find_unused_parameters,
          "gradient_as_bucket_view": ddp.gradient_as_bucket_view, "static_graph": ddp.static_graph}
    if "forward_sync_buffers" in accepted and hasattr(ddp, "forward_sync_buffers"):
        kw["forward_sync_buffers"] = ddp.forward_sync_buffers
    elif hasattr(ddp, "broadcast_buffers"):
        kw["broadcast_buffers"] = ddp.broadcast_buffers
    return {k: v for k, v in kw.items() if k in accepted}


def _update_optimizer(optimizer: torch.optim.Optimizer, module: nn.Module, added: list[str]) -> list[str]:
    """Drop parameters no longer in ``module`` (and their state); put each added one into the group
    of its module's other parameters (group 0 when it has none)."""
    named = dict(module.named_parameters())
    alive = {id(p) for p in named.values()}
    notes, dropped = [], 0
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in alive:
                optimizer.state.pop(p, None)
                dropped += 1
        g["params"] = [p for p in g["params"] if id(p) in alive]
    if dropped:
        notes.append(f"dropped {dropped} parameter(s) no longer in the model, with their state")
    where = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    for name in added:
        p = named[name]
        if id(p) in where:
            notes.append(f"{name}: already in parameter group {where[id(p)]}")
            continue
        owner = name.rpartition(".")[0]
        sibling = next((n for n, q in named.items() if n.rpartition(".")[0] == owner and id(q) in where), None)
        i = where[id(named[sibling])] if sibling else 0
        optimizer.param_groups[i]["params"].append(p)
        where[id(p)] = i
        notes.append(f"{name}: added to parameter group {i} ({f'the group of {sibling}' if sibling else 'no sibling'}"
                     f"), with fresh state")
    return notes


def rewrap(ddp: nn.parallel.DistributedDataParallel, optimizer: torch.optim.Optimizer | None = None, *,
           rebuild: bool = False, **overrides: Any) -> Rewrap:
    """Bring a ``DistributedDataParallel`` wrapper up to date after its module was rewired in place
    (call it on every rank, after the rewiring and before the next forward).

    * Nothing added or removed: the buffers are broadcast from rank 0 (DDP does so at every forward;
      now an evaluation before the next forward sees them too) and ``ddp`` is kept.
    * Parameters that appeared (a conv bias made by SConv's compensation) or were replaced (a new
      tensor, e.g. of another shape): a new wrapper over the same module with the same settings
      (``overrides`` change them), which broadcasts rank 0's parameters and buffers; the old one's
      gradient hooks are removed, so it must not be used again; communication hooks registered on it
      are not carried over. With ``optimizer``: parameters no longer in the model are dropped from
      it with their state, added ones join the group of their module's other parameters.
    * ``rebuild=True`` (or ``overrides``): a new wrapper in any case — after switching parameters'
      ``requires_grad`` (DDP averages the parameters that required gradients when it was built).
    """
    if not isinstance(ddp, nn.parallel.DistributedDataParallel):
        raise TypeError(f"rewrap expects a torch.nn.parallel.DistributedDataParallel, got {type(ddp).__name__}")
    module = ddp.module
    known = {id(p) for p in ddp._module_parameters}
    current = [(n, p) for n, p in module.named_parameters() if n not in ddp.parameters_to_ignore]
    added = [n for n, p in current if id(p) not in known]
    dropped = len(known - {id(p) for _, p in current})
    notes = _update_optimizer(optimizer, module, added) if optimizer is not None and (added or dropped) else []
    if not added and not dropped and not rebuild and not overrides:
        broadcast_tensors([b for n, b in module.named_buffers() if n not in ddp.parameters_to_ignore],
                          resolve_group(ddp.process_group), what="rewrap")
        return Rewrap(ddp, False, optimizer=notes)
    settings = _settings(ddp) | overrides
    if hasattr(ddp, "_remove_autograd_hooks"):
        ddp._remove_autograd_hooks()
    try:
        new = nn.parallel.DistributedDataParallel(module, **settings)
    except RuntimeError as e:
        raise _error("rewrap", "DistributedDataParallel construction (broadcast of rank 0's state)",
                     ddp.process_group, e) from e
    return Rewrap(new, True, added, dropped, notes)
