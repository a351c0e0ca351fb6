"""Real multi-process runs for ``tests/test_distributed.py`` (not a test module).

:func:`launch` starts ``world`` processes with the spawn start method. Each joins a gloo group on
loopback through a FileStore in its own folder (no port to pick) with a short timeout, runs one
*scenario* of this module and saves what it returns (tensors, numbers, strings, lists, dicts) to
``rank{r}.pt``; a rank that raises writes its traceback to ``rank{r}.err``. The parent waits until
a deadline, kills whatever still runs, and fails naming the ranks that hung or failed: nothing
here can hang a test run.

The data and models are built by the same functions in the workers and in the parent (whose
single-process references run with torch.distributed not initialised).
"""
from __future__ import annotations

import copy
import datetime
import multiprocessing as mp
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def launch(scenario: str, folder: Path, world: int = 2, *, deadline_s: float = 150.0, pg_timeout_s: float = 30.0,
           dying: tuple[int, ...] = (), **kwargs: Any) -> list[Any]:
    """Run ``scenario(rank, world, **kwargs)`` on ``world`` processes; returns each rank's result
    (None for the ``dying`` ranks, which the scenario ends on purpose)."""
    folder = Path(folder) / scenario
    folder.mkdir(parents=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_main, args=(scenario, r, world, str(folder), pg_timeout_s, kwargs), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    errors = {r: (folder / f"rank{r}.err").read_text() for r in range(world) if (folder / f"rank{r}.err").exists()}
    missing = [r for r in range(world) if r not in hung and r not in errors and r not in dying
               and not (folder / f"rank{r}.pt").exists()]
    if hung or errors or missing:
        lines = [f"scenario {scenario!r} on {world} processes:"]
        if hung:
            lines.append(f"ranks {hung} still ran after {deadline_s:.0f} s and were killed")
        if missing:
            lines.append(f"ranks {missing} exited (codes {[procs[r].exitcode for r in missing]}) without a result")
        lines += [f"--- rank {r} raised:\n{text}" for r, text in sorted(errors.items())]
        raise AssertionError("\n".join(lines))
    return [None if r in dying else torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world)]


def launch_once(scenario: str, root: Path, **kwargs: Any) -> list[Any]:
    """:func:`launch`, once per test session even across pytest-xdist workers that share ``root``:
    the first caller runs it and leaves its results (or its failure) there; the others wait."""
    root = Path(root)
    done, failed, saved = (root / f"{scenario}.{x}" for x in ("done", "failed", "results.pt"))
    try:
        os.close(os.open(root / f"{scenario}.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        end = time.monotonic() + kwargs.get("deadline_s", 150.0) + 60
        while not done.exists():
            if time.monotonic() > end:
                raise AssertionError(f"waited in vain for another test worker's launch of {scenario!r} ({root})")
            time.sleep(0.2)
    else:
        try:
            torch.save(launch(scenario, root, **kwargs), saved)
        except AssertionError as e:
            failed.write_text(str(e))
        finally:
            done.touch()
    if failed.exists():
        raise AssertionError(failed.read_text())
    return torch.load(saved, weights_only=True)


def _main(scenario: str, rank: int, world: int, folder: str, pg_timeout_s: float, kwargs: dict) -> None:
    import torch.distributed as dist
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        result = globals()[scenario](rank, world, **kwargs)
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    except SystemExit:                       # a rank that a scenario ends on purpose
        raise
    except BaseException:
        (Path(folder) / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)          # no teardown: the other ranks may be stuck in a collective
    dist.destroy_process_group()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (every one, persistent or not), detached copies."""
    from graphsel.distributed import unwrap
    module = unwrap(model)
    out = {f"param:{n}": p.detach().clone() for n, p in module.named_parameters()}
    out |= {f"buffer:{n}": b.detach().clone() for n, b in module.named_buffers()}
    return out


def ce_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def sync_buffers(ddp: nn.Module, x: torch.Tensor) -> None:
    """An eval forward through DDP: it broadcasts rank 0's buffers (BatchNorm statistics) first."""
    ddp.eval()
    with torch.no_grad():
        ddp(x)
    ddp.train()


def labelled(seed: int, batches: int, n: int, shape: tuple[int, ...], classes: int = 4) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g))
            for _ in range(batches)]


def concatenated(per_rank: list[list]) -> list:
    """Batch i of the single process: batch i of every rank, concatenated in rank order."""
    return [(torch.cat([b[i][0] for b in per_rank]), torch.cat([b[i][1] for b in per_rank]))
            for i in range(len(per_rank[0]))]


# -- SConv ---------------------------------------------------------------------------------------

def sconv_model() -> torch.fx.GraphModule:
    import graphsel
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 1, bias=False),
                        nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 8, 1, bias=False), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 4))
    return graphsel.transform(net, [("insert_selective_conv", {"gamma": 0.2})], torch.randn(2, 3, 6, 6),
                              progress=False)


def sconv(rank: int, world: int) -> dict:
    """DDP with its defaults and a schedule without seed, then module-level dealloc / realloc
    (global generator), each rank seeded differently: every decision must still be rank 0's."""
    from graphsel.distributed import assert_replicas_equal, local
    from graphsel.passes import selective_conv as sc
    gm = sconv_model()
    torch.manual_seed(100 + rank)                 # rank-dependent global RNG: realloc's default generator
    opt = torch.optim.SGD(sc.param_groups(gm), lr=0.1, momentum=0.9)
    schedule = sc.SelectiveSchedule(gm, 4, optimizer=opt, seed=None)
    ddp = nn.parallel.DistributedDataParallel(gm)
    data = labelled(10 + rank, 3, 4, (3, 6, 6))
    losses, records = [], []
    for epoch in range(3):
        for x, y in data:
            losses.append(ce_step(ddp, opt, x, y))
        rec = schedule.on_epoch_end(epoch)
        records.append(None if rec is None else [(a.path, a.deallocated, a.reallocated, a.copies) for a in rec.layers])
    closed = {p: r.closed for p, r in sc.dealloc(ddp.module, gamma=0.5).items()}
    alone = copy.deepcopy(gm)
    with local():                                 # the control: each rank's own draws
        alone_shifts = {p: m.shift[r.reallocated[0][0]].tolist() for (p, r), (_, m)
                        in zip(sc.realloc(alone).items(), sc.selective_modules(alone)) if r.reallocated}
    copies = {p: r.reallocated for p, r in sc.realloc(ddp.module).items()}
    slots = {p: torch.stack([m.is_open, m.source.to(m.is_open.dtype)]) for p, m in sc.selective_modules(gm)}
    for x, y in data:
        losses.append(ce_step(ddp, opt, x, y))
    assert_replicas_equal(ddp)                    # parameters (DDP syncs buffers at its next forward)
    sync_buffers(ddp, data[0][0])
    assert_replicas_equal(gm)                     # and buffers
    return {"state": state(gm), "records": records, "closed": closed, "copies": copies, "losses": losses,
            "alone_shifts": alone_shifts, "slots": slots,
            "allocation": [(a.path, a.own, a.copies, a.closed) for a in sc.allocation(gm)]}


# -- DGC -----------------------------------------------------------------------------------------

def dgc_model() -> torch.fx.GraphModule:
    """A DGC ResNet-8 whose saliency generators are random (saliencies spread out, not ≡ 1)."""
    import graphsel
    from graphsel.passes import dynamic_group_conv as dgc
    from graphsel.tools.models import resnet_cifar
    torch.manual_seed(0)
    model = graphsel.transform(resnet_cifar(8, shortcut="B", in_channels=1), [("dynamic_group_conv", {"ratio": 0.5})],
                               torch.randn(2, 1, 8, 8), progress=False)
    gen = torch.Generator().manual_seed(0)
    for _, m in dgc.dgc_modules(model):
        with torch.no_grad():
            m.saliency.fc2_weight.copy_(torch.randn(m.saliency.fc2_weight.shape, generator=gen))
            m.saliency.fc2_bias.copy_(torch.randn(m.saliency.fc2_bias.shape, generator=gen) * 0.5 + 0.5)
    return model.eval()


def dgc_calibration(model: nn.Module, batches: list) -> dict:
    """The global threshold from data and from a library, the kept fractions, the library's rates."""
    from graphsel.passes import dynamic_group_conv as dgc
    t_data = dgc.calibrate_global_threshold(model, batches, ratio=0.5, refine=2)
    keep = {p: m.keep_fraction.clone() for p, m in dgc.dgc_modules(model)}
    with torch.no_grad(), dgc.SaliencyLibrary(model, window=len(batches)) as lib:
        for x in batches:
            model(x)
    t_lib = dgc.calibrate_global_threshold(model, library=lib, ratio=0.4)
    return {"t_data": t_data, "keep": keep, "t_lib": t_lib, "rates": lib.pruning_rates(t_lib)}


def dgc_data(rank: int) -> list:
    g = torch.Generator().manual_seed(20 + rank)
    return [torch.randn(3 + rank, 1, 8, 8, generator=g) for _ in range(2)]    # ranks hold different counts


def dgc_(rank: int, world: int) -> dict:
    """Calibration on each rank's data; then DGCTraining (global threshold) inside DDP."""
    from graphsel.distributed import assert_replicas_equal
    from graphsel.passes import dynamic_group_conv as dgc
    out = dgc_calibration(dgc_model(), dgc_data(rank))
    model = dgc_model().train()
    trainer = dgc.DGCTraining(model, 6, gating="global", threshold_updates=3, window=2)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    for step, (x, y) in enumerate(labelled(30 + rank, 6, 4, (1, 8, 8), classes=10)):
        trainer.before_step(step)
        loss = F.cross_entropy(ddp(x), y) + trainer.regularizer()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        trainer.after_step(step)
    report = trainer.finish()
    assert_replicas_equal(ddp)
    sync_buffers(ddp, x)
    assert_replicas_equal(model)
    return out | {"state": state(model), "history": [(u.step, u.threshold, u.ratio) for u in report.history]}


# -- DCP -----------------------------------------------------------------------------------------

def dcp_model() -> nn.Module:
    from graphsel.tools.models import preact_resnet_cifar
    torch.manual_seed(0)
    return preact_resnet_cifar(8, in_channels=1).eval()


def dcp_data(rank: int) -> list:
    return labelled(40 + rank, 2, 4, (1, 8, 8), classes=10)


def dcp_selection(data: list) -> dict:
    """The dcp pass (one inserted head, fitted; two masked-SGD steps per selection) on ``data``."""
    import graphsel
    from graphsel.passes import dcp
    gm = graphsel.transform(dcp_model(), [("dcp", {"ratio": 0.5, "data": data, "heads": 1, "steps": 2,
                                                   "head_iters": 10, "progress": False})],
                            torch.randn(2, 1, 8, 8), progress=False)
    layers = dcp.dcp_state(gm)["layers"]
    return {"order": {p: r["order"] for p, r in layers.items()}, "losses": {p: r["losses"] for p, r in layers.items()},
            "head_fit": dcp.dcp_state(gm)["head_fit"], "selected": state(gm)}


def dcp_(rank: int, world: int) -> dict:
    """The dcp pass on each rank's data; phase 1 fine-tuning (both modes) on each rank's data."""
    import graphsel
    from graphsel.distributed import assert_replicas_equal
    from graphsel.passes import dcp
    out = dcp_selection(dcp_data(rank))
    gm = graphsel.transform(dcp_model(), [("dcp_heads", {"heads": 2})], torch.randn(2, 1, 8, 8), progress=False)
    losses = {mode: dcp.finetune(gm, dcp_data(rank), mode=mode, lr=0.05, progress=False).losses
              for mode in ("alternate", "sum")}
    assert_replicas_equal(gm)
    return out | {"finetuned": state(gm), "finetune_losses": losses}


# -- BSN -----------------------------------------------------------------------------------------

class TinyResidual(nn.Module):
    """Two gated residual branches, no BatchNorm: every sample's loss depends on that sample only,
    so two ranks' batches are exactly one process's concatenated batch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.b1 = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
        self.b2 = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.b1(x))
        x = torch.relu(x + self.b2(x))
        return self.head(x.mean((2, 3)))


def bsn_model() -> torch.fx.GraphModule:
    import graphsel
    torch.manual_seed(0)
    return graphsel.transform(TinyResidual(), [("budget_gates", {"on": "residual"})], torch.randn(2, 1, 6, 6),
                              progress=False)


class FixedDraws:
    """Stands in for ``torch.bernoulli`` in the gates: gate call i of a forward draws
    ``table[i % gates]`` from sample ``offset`` on, so ranks and one process see the same
    architecture per sample of the global batch."""

    def __init__(self, table: torch.Tensor, offset: int):
        self.table, self.offset, self.calls = table, offset, 0

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        row = self.table[self.calls % len(self.table)]
        self.calls += 1
        return row[self.offset:self.offset + p.numel()].to(p.dtype).view_as(p)


def bsn_step(trainer, x: torch.Tensor, y: torch.Tensor, offset: int) -> dict:
    """One surrogate-loss backward with the draws of ``FixedDraws``: the baseline, the gate
    statistics and the gradients (averaged by DDP when the trainer's model is a DDP wrapper)."""
    table = torch.rand(len(trainer._gates), 8, generator=torch.Generator().manual_seed(5)) < 0.5
    seen = []
    statistics = trainer.statistics
    trainer.statistics = lambda reward, H: seen.append(statistics(reward, H)) or seen[-1]
    bernoulli, torch.bernoulli = torch.bernoulli, FixedDraws(table, offset)
    try:
        trainer.model.train()
        loss, _ = trainer.loss(trainer.model(x), y)
        loss.backward()
    finally:
        torch.bernoulli = bernoulli
        trainer.statistics = statistics
    return {"baseline": float(seen[0]["baseline"]), "gate_on": seen[0]["gate_on"],
            "grads": {n: p.grad.clone() for n, p in trainer.module.named_parameters() if p.grad is not None}}


def bsn_data(rank: int) -> list:
    return labelled(50 + rank, 3, 4, (1, 6, 6))


def bsn_(rank: int, world: int) -> dict:
    """BudgetedTrainer around a DDP wrapper (default settings): a warm-up epoch (no logit in the
    loss) and a sampling epoch; then one step with fixed draws against one process."""
    from graphsel.distributed import assert_replicas_equal
    from graphsel.passes import bsn
    torch.manual_seed(60 + rank)                          # each rank its own architectures
    gm = bsn_model()
    ddp = nn.parallel.DistributedDataParallel(gm)
    trainer = bsn.BudgetedTrainer(ddp, fraction=0.6, cost="macs")
    opt = torch.optim.SGD(trainer.param_groups(logit_lr=0.5), lr=0.05, momentum=0.9)
    history = trainer.fit(bsn_data(rank), opt, epochs=2, warmup_epochs=1, progress=False)
    assert_replicas_equal(ddp)
    step = bsn_step(bsn.BudgetedTrainer(nn.parallel.DistributedDataParallel(bsn_model()), fraction=0.6),
                    *bsn_data(rank)[0], offset=4 * rank)
    return {"state": state(gm), "history": history, "step": step}


# -- DistributedDataParallel after a rewiring (the README's example) -----------------------------

def ddp_rewiring(rank: int, world: int) -> dict:
    """Rewire the module inside DDP, then tell DDP: SConv's schedule with compensate=True gives the
    convs new biases, which the wrapper built before does not know."""
    from graphsel import distributed as gd
    from graphsel.errors import DistributedError, ReplicaMismatchError
    from graphsel.passes import selective_conv as sc
    data = labelled(70 + rank, 2, 4, (3, 6, 6))
    gm = sconv_model()
    opt = torch.optim.SGD(sc.param_groups(gm), lr=0.1, momentum=0.9)
    ddp = nn.parallel.DistributedDataParallel(gm)
    out = {}
    try:
        sc.SelectiveSchedule(ddp, 3, compensate=True)             # given the wrapper, it refuses
    except DistributedError as e:
        out["refused"] = str(e)
    schedule = sc.SelectiveSchedule(ddp.module, 3, compensate=True, optimizer=opt)   # biases appear
    try:
        gd.assert_replicas_equal(ddp)
    except DistributedError as e:
        out["stale"] = str(e)
    first = gd.rewrap(ddp, opt)                                    # a new wrapper that knows them
    ddp = first.model
    out["first"] = {"rebuilt": first.rebuilt, "added": first.added, "optimizer": first.optimizer}
    out["later"] = []
    for epoch in range(3):
        for x, y in data:
            ce_step(ddp, opt, x, y)
        schedule.on_epoch_end(epoch)                              # rank 0 decides, every rank applies
        again = gd.rewrap(ddp, opt)                               # nothing new: buffers re-broadcast
        ddp = again.model
        out["later"].append(again.rebuilt)
    gd.assert_replicas_equal(ddp)
    gd.assert_replicas_equal(gm)                                  # buffers too: rewrap broadcast them
    out["state"] = state(gm)
    out["biases"] = [bool(m.conv.bias is not None and m.conv.bias.abs().sum() > 0) for _, m in sc.selective_modules(gm)]
    with torch.no_grad():                                          # the check itself: one rank drifts
        if rank == 1:
            gm.get_parameter("6.conv.weight")[0, 0] += 1e-3
    try:
        gd.assert_replicas_equal(gm)
    except ReplicaMismatchError as e:
        out["mismatch"] = {"name": e.name, "ranks": e.ranks, "message": str(e)}
    return out


# -- FSDP2 ---------------------------------------------------------------------------------------

def fsdp(rank: int, world: int) -> dict:
    """A rewired SConv model (copies made before sharding) trained under fully_shard, against the
    same steps under DDP; rewiring the sharded model is refused; DGC calibrates under fully_shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from graphsel.distributed import sync_buffers
    from graphsel.errors import DistributedError
    from graphsel.passes import dynamic_group_conv as dgc
    from graphsel.passes import selective_conv as sc
    mesh = init_device_mesh("cpu", (world,))
    data = labelled(80 + rank, 3, 4, (3, 6, 6))
    models = {}
    for kind in ("ddp", "fsdp"):
        gm = sconv_model()
        sc.dealloc(gm, gamma=0.5)
        sc.realloc(gm)                                             # rewire the full model, then shard
        wrapped = nn.parallel.DistributedDataParallel(gm) if kind == "ddp" else fully_shard(gm, mesh=mesh)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
        for x, y in data:
            ce_step(wrapped, opt, x, y)
        models[kind] = gm
    out = {"copies": sum(a.copies for a in sc.allocation(models["fsdp"]))}
    try:
        sc.dealloc(models["fsdp"])
    except DistributedError as e:
        out["refused"] = str(e)
    full = {n: p.full_tensor() for n, p in models["fsdp"].named_parameters()}
    out["gap"] = max((full[n] - p).abs().max().item() for n, p in models["ddp"].named_parameters())
    out["full"] = full
    out["buffers"] = {n: b.clone() for n, b in models["fsdp"].named_buffers()}
    sync_buffers(models["fsdp"])
    out["synced"] = {n: b.clone() for n, b in models["fsdp"].named_buffers()}
    sharded = fully_shard(dgc_model(), mesh=mesh)
    out["t_data"] = dgc.calibrate_global_threshold(sharded, dgc_data(rank), ratio=0.5, refine=2)
    return out


# -- failures ------------------------------------------------------------------------------------

def failures(rank: int, world: int, silent_s: float = 6.0, timeout_s: float = 2.0) -> dict:
    """Rank 1 stays silent for ``silent_s`` seconds, then exits without a word. Rank 0 meanwhile
    calls SConv's dealloc on a group with a ``timeout_s`` timeout (a peer that does not answer),
    then the schedule's epoch end on the default group (a peer that dies)."""
    import torch.distributed as dist
    from graphsel.errors import DistributedError
    from graphsel.passes import selective_conv as sc
    short = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    gm = sconv_model()
    schedule = sc.SelectiveSchedule(gm, 2)
    if rank == 1:
        time.sleep(silent_s)
        raise SystemExit(0)                  # gone, without a word (and without closing the group)
    out = {}
    for case, call in (("timeout", lambda: sc.dealloc(gm, process_group=short)),
                       ("died", lambda: schedule.on_epoch_end(0))):
        t0 = time.monotonic()
        try:
            call()
            out[case] = {"raised": None}
        except DistributedError as e:
            out[case] = {"raised": type(e).__name__, "message": str(e), "collective": e.collective, "rank": e.rank,
                         "world_size": e.world_size, "seconds": time.monotonic() - t0}
    return out


# -- every method in one launch (process start-up is most of a launch's time) ---------------------

METHODS = ("sconv", "ddp_rewiring", "dgc_", "dcp_", "bsn_", "fsdp")


def methods(rank: int, world: int) -> dict:
    """Run the scenarios of :data:`METHODS` in turn; one that raises is recorded with its traceback
    and the later ones are not run (the ranks' collectives would no longer match)."""
    out: dict[str, Any] = {}
    for name in METHODS:
        failed = next((k for k, v in out.items() if "error" in v), None)
        if failed:
            out[name] = {"error": f"not run: scenario {failed!r} failed first"}
            continue
        try:
            out[name] = globals()[name](rank, world)
        except Exception:
            out[name] = {"error": traceback.format_exc()}
    return out
