"""Selective convolution trained for real: Fashion-MNIST, baseline DenseNet vs DenseNet-SConv.

Two copies of the same DenseNet (``graphsel.tools.models.densenet_cifar``, bottleneck units, 1 input
channel, same random initialisation) are trained side by side on the same batches, one SGD step
each per batch, so their step times are measured under the same machine load:

* ``baseline``: the plain network;
* ``sconv``: the ``insert_selective_conv`` pass (K = 3 for 1×1 convs, 0 for 3×3, γ = 1e-3) and the
  paper's schedule (000, B.1): dealloc → realloc at the end of every epoch for the first half of
  training; shifts at weight decay 1e-5.

Both: SGD with Nesterov momentum 0.9, cosine learning rate from 0.1 to 0, weight decay 1e-4,
batch 128, the paper's augmentation (random translation up to 4 pixels, horizontal flip).

After training: test accuracy of both; the SConv model exported with
``lower_selective_conv → fold_masks → materialize`` (verified exact) and its accuracy, parameters and
MACs (``graphsel.cost``); the fraction of slots closed and re-allocated per layer, with a plot like the
papers' channel-allocation figures; the training-step time of SConv relative to the baseline (over the
whole run and in a final alternating micro-benchmark); the eval latency of the SConv training model,
the exported model and the baseline.

The paper reports DenseNet-40 on Fashion-MNIST at 5.03 % → 4.73 % error after 300 epochs on the full
training set; a CPU budget gets a shallower DenseNet through a few epochs on a subset. With
``--budget-min`` (default 18) the training-set size is chosen from a short timing calibration so that
the whole run fits the budget on the machine at hand (``--train-limit`` fixes it instead).

Run: ``python -m benchmarks.sconv_fashion_mnist`` (full, ≈ 20 min on 2 cores) or ``--quick`` (a smoke
test, about a minute). Writes ``benchmarks/results/sconv_fashion_mnist{,_quick}.{json,md}`` and
``..._allocation.png``. ``--compile`` also times the training step under ``torch.compile`` (inductor;
several minutes of compilation on CPU).

Distributed: ``OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m benchmarks.sconv_fashion_mnist --quick
--threads 1`` trains both models inside DistributedDataParallel (default settings, gloo on the CPU):
each rank takes its share of every global batch of ``--batch-size`` (a DistributedSampler), the
schedule is the single-process one (rank 0's dealloc/realloc decisions, broadcast), the epoch
statistics are over every rank, and at the end every rank checks that its parameters are
bit-identical to rank 0's (``graphsel.assert_replicas_equal``). Rank 0 then evaluates, exports and
writes ``sconv_fashion_mnist[_quick]_ddp<N>.{json,md}``.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):                       # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import graphsel
from graphsel import distributed as gd
from benchmarks.common import (RESULTS, environment, environment_line, human, measure, result_stem, set_threads,
                               table, write_results)
from benchmarks.train import augment, loader_accuracy, sgd_step
from graphsel.tools.datasets import fashion_mnist
from graphsel.tools.models import densenet_cifar
from graphsel.passes import selective_conv as sc

PAPER = {"model": "DenseNet-40 (bottleneck, k = 12)", "epochs": 300, "baseline_error": 5.03, "sconv_error": 4.73}


# -- models ---------------------------------------------------------------------------------

PAPER_GAMMA, PAPER_CALLS = 1e-3, 150   # γ per dealloc call; 300 epochs, dealloc/realloc in the first half


def scaled_gamma(calls: int) -> float:
    """The per-call threshold that spreads the paper's total damage budget over ``calls`` dealloc calls:
    closing ≤ γ of the remaining normalised damage per call compounds to 1 − (1 − γ)^calls, so
    ``1 − (1 − 1e-3)^(150 / calls)``. (At the paper's γ = 1e-3, a few epochs close nothing.)"""
    return 1 - (1 - PAPER_GAMMA) ** (PAPER_CALLS / max(calls, 1))


def would_close(sconv, gamma: float) -> int:
    """Slots dealloc would close now at ``gamma`` (on copies; the model is not changed)."""
    with gd.local():                  # a what-if on copies, the same on every rank: no collective
        return sum(len(sc.dealloc_layer(copy.deepcopy(m), gamma=gamma).closed) for _, m in sc.selective_modules(sconv))


def build_models(args) -> tuple[nn.Module, torch.fx.GraphModule]:
    torch.manual_seed(args.seed)
    base = densenet_cifar(args.depth, args.growth, in_channels=1, num_classes=10)
    sconv = graphsel.transform(copy.deepcopy(base), [("insert_selective_conv", {"gamma": args.gamma})],
                               torch.randn(2, 1, 28, 28), progress=False)
    return base, sconv


def make_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    return torch.optim.SGD(sc.param_groups(model, args.weight_decay, args.shift_weight_decay), lr=args.lr,
                           momentum=0.9, nesterov=True)


# -- budget ---------------------------------------------------------------------------------

def calibrate_pair_step(args) -> float:
    """Seconds of one baseline step plus one SConv step (with 25 % copies, the typical state after
    realloc) at the training batch size, on fresh models."""
    base, sconv = build_models(args)
    sc.randomize_state(sconv, p_closed=0.0, p_copy=0.25)
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    pairs = []
    for model in (base, sconv):
        model.train()
    opts = [make_optimizer(m, args) for m in (base, sconv)]
    for i in range(4):
        t0 = time.perf_counter()
        for m, o in zip((base, sconv), opts):
            sgd_step(m, o, x, y)
        if i:
            pairs.append(time.perf_counter() - t0)
    return min(pairs)


# -- training -------------------------------------------------------------------------------

def train(args, train_set: TensorDataset, test_loader: DataLoader) -> dict:
    base, sconv = build_models(args)
    models = {"baseline": base, "sconv": sconv}
    opts = {k: make_optimizer(m, args) for k, m in models.items()}
    schedule = sc.SelectiveSchedule(sconv, args.epochs, optimizer=opts["sconv"], seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    aug = torch.Generator().manual_seed(args.seed + 1 + args.rank)
    if args.world > 1:                # each rank its share of every global batch; DDP with its defaults
        steppers = {k: nn.parallel.DistributedDataParallel(m) for k, m in models.items()}
        sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed, drop_last=True)
        loader = DataLoader(train_set, batch_size=args.batch_size // args.world, sampler=sampler, drop_last=True)
    else:
        steppers, sampler = models, None
        loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen, drop_last=True)
    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    lrs = {k: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
           for k, o in opts.items()}
    step_times = {k: [] for k in models}
    log = []
    t_start = time.perf_counter()
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        stats = {k: {"loss": 0.0, "correct": 0, "seen": 0, "times": []} for k in models}
        for m in models.values():
            m.train()
        for x, y in loader:
            x = augment(x, aug)
            for k, m in steppers.items():
                t0 = time.perf_counter()
                loss, out = sgd_step(m, opts[k], x, y)
                dt = time.perf_counter() - t0
                lrs[k].step()
                s = stats[k]
                s["times"].append(dt)
                s["loss"] += loss * len(y)
                s["correct"] += int((out.argmax(1) == y).sum())
                s["seen"] += len(y)
        for k, s in stats.items():    # over every rank (nothing to do in one process)
            s["loss"], s["correct"], s["seen"] = gd.sum_over([s["loss"], s["correct"], s["seen"]], gd.resolve_group(),
                                                             what="the epoch statistics")
        paper_would_close = would_close(sconv, PAPER_GAMMA) if schedule.active(epoch) else None
        record = schedule.on_epoch_end(epoch)
        entry = {"epoch": epoch + 1, "seconds": time.perf_counter() - t_start}
        if paper_would_close is not None:
            entry["would_close_at_paper_gamma"] = paper_would_close
        for k, s in stats.items():
            step_times[k] += s["times"]
            entry[k] = {"train_loss": s["loss"] / s["seen"], "train_accuracy": s["correct"] / s["seen"],
                        "median_step_s": statistics.median(s["times"])}
        entry["step_ratio"] = entry["sconv"]["median_step_s"] / entry["baseline"]["median_step_s"]
        if record is not None:
            entry["deallocated"], entry["reallocated"] = record.deallocated, record.reallocated
        alloc = sc.allocation(sconv)
        entry["copies"] = sum(a.copies for a in alloc)
        entry["closed"] = sum(a.closed for a in alloc)
        log.append(entry)
        print(f"epoch {epoch + 1}/{args.epochs}: baseline loss {entry['baseline']['train_loss']:.3f} acc "
              f"{entry['baseline']['train_accuracy']:.3f} | sconv loss {entry['sconv']['train_loss']:.3f} acc "
              f"{entry['sconv']['train_accuracy']:.3f} | step ratio {entry['step_ratio']:.2f} | "
              + (f"dealloc {record.deallocated}, realloc {record.reallocated} | " if record else "")
              + f"copies {entry['copies']}, closed {entry['closed']} ({entry['seconds']:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - t_start
    if args.world > 1:                # every rank: parameters bit-identical to rank 0's (buffers: rank 0's own)
        for k, m in steppers.items():
            graphsel.assert_replicas_equal(m)
        n = sum(1 for m in models.values() for _ in m.parameters())
        print(f"replicas checked: the {n} parameters of both models are bit-identical on the {args.world} ranks",
              flush=True)
    return {"models": models, "schedule": schedule, "log": log, "train_seconds": train_seconds,
            "step_times": step_times, "steps_per_epoch": steps_per_epoch}


# -- measurements ---------------------------------------------------------------------------

def step_benchmark(base, sconv, args) -> dict:
    """Alternating micro-benchmark of one training step (final state; copies of the models so the
    trained ones are not changed)."""
    x = torch.randn(args.batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (args.batch_size,), generator=torch.Generator().manual_seed(1))
    cands = {}
    for name, model in (("baseline", base), ("sconv", sconv)):
        m = copy.deepcopy(model).train()
        opt = make_optimizer(m, args)
        cands[name] = (lambda m=m, opt=opt: sgd_step(m, opt, x, y))
    return measure(cands, repeats=args.step_repeats, warmup=1)


def compiled_step_benchmark(base, sconv, args) -> dict:
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    cands, compile_s = {}, {}
    for name, model in (("baseline", base), ("sconv", sconv)):
        m = copy.deepcopy(model).train()
        cm = torch.compile(m)
        opt = make_optimizer(m, args)
        t0 = time.perf_counter()
        sgd_step(cm, opt, x, y)
        compile_s[name] = time.perf_counter() - t0
        cands[name] = (lambda cm=cm, opt=opt: sgd_step(cm, opt, x, y))
    out = measure(cands, repeats=args.step_repeats, warmup=1)
    for k in out:
        out[k]["first_step_s"] = compile_s[k]
    return out


def latency(models: dict[str, nn.Module], args) -> dict:
    out = {}
    for batch, repeats in ((1, args.latency_repeats), (args.batch_size, max(3, args.latency_repeats // 4))):
        x = torch.randn(batch, 1, 28, 28)
        cands = {}
        for name, m in models.items():
            m.eval()
            cands[name] = (lambda m=m: _infer(m, x))
        out[str(batch)] = measure(cands, repeats=repeats, warmup=2)
    return out


def _infer(m, x):
    with torch.inference_mode():
        return m(x)


def layer_table(sconv, schedule) -> list[dict]:
    rows = []
    for a in sc.allocation(sconv):
        m = sconv.get_submodule(a.path)
        t = schedule.totals[a.path]
        rows.append({"layer": a.path, "kernel": f"{m.conv.kernel_size[0]}x{m.conv.kernel_size[1]}", "K": m.K,
                     "slots": a.slots, "own": a.own, "copies": a.copies, "closed": a.closed,
                     "closed_fraction": a.closed / a.slots, "copy_fraction": a.copies / a.slots,
                     "ever_deallocated": t["deallocated"], "ever_reallocated": t["reallocated"]})
    return rows


def plot(rows: list[dict], log: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(rows)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(7, 0.32 * n + 2), 6.2), gridspec_kw={"height_ratios": [3, 2]})
    xs = range(n)
    own = [r["own"] / r["slots"] for r in rows]
    cop = [r["copy_fraction"] for r in rows]
    clo = [r["closed_fraction"] for r in rows]
    ax.bar(xs, own, color="#8da0cb", label="own channel")
    ax.bar(xs, cop, bottom=own, color="#66c2a5", label="re-allocated copy (shifted)")
    ax.bar(xs, clo, bottom=[a + b for a, b in zip(own, cop)], color="#fc8d62", label="de-allocated (closed)")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of input slots")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r['layer'].replace('features.', '').replace('.conv', '')} {r['kernel']}" for r in rows],
                       rotation=80, fontsize=6)
    ax.set_title("DenseNet-SConv on Fashion-MNIST: channel allocation per layer at the end of training", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    epochs = [e["epoch"] for e in log]
    ax2.plot(epochs, [e.get("deallocated", 0) for e in log], "o-", color="#fc8d62", label="slots de-allocated")
    ax2.plot(epochs, [e.get("reallocated", 0) for e in log], "s-", color="#66c2a5", label="slots re-allocated")
    ax2.plot(epochs, [e["closed"] for e in log], "--", color="#e34a33", label="closed (total)")
    ax2.plot(epochs, [e["copies"] for e in log], "--", color="#1b9e77", label="copies (total)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("slots")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- report ---------------------------------------------------------------------------------

def markdown(res: dict) -> str:
    a = res["config"]
    acc = res["accuracy"]
    lines = [f"# Selective convolution on Fashion-MNIST: densenet_cifar({a['depth']}, k = {a['growth']})"
             f"{' (quick smoke run)' if a['quick'] else ''}", "", environment_line(res["environment"]), "",
             f"{a['train_samples']} training images ({a['train_samples_reason']}), {a['epochs']} epochs, batch "
             f"{a['batch_size']}, SGD Nesterov 0.9, cosine lr from {a['lr']}, weight decay {a['weight_decay']} "
             f"(shifts {a['shift_weight_decay']}), translation ±4 px + flip; dealloc → realloc after epochs "
             f"1–{res['schedule_epochs']}; γ = {a['gamma']:.4g} ({a['gamma_reason']}). Test: {a['test_samples']} images. "
             f"Training took "
             f"{res['train_seconds']:.0f} s for both models"
             + (f", on {a['world']} processes (torchrun; DistributedDataParallel with gloo, each process "
                f"{a['batch_size'] // a['world']} samples of every batch; parameters bit-identical on every rank at "
                f"the end)" if a.get("world", 1) > 1 else "") + ".", "",
             "## Accuracy and size", ""]
    c = res["cost"]
    rows = [["baseline", f"{100 * acc['baseline']:.2f}", f"{100 * (1 - acc['baseline']):.2f}", human(c["baseline"]["params"]),
             human(c["baseline"]["macs"])],
            ["SConv (training model)", f"{100 * acc['sconv']:.2f}", f"{100 * (1 - acc['sconv']):.2f}",
             human(c["sconv"]["params"]), human(c["sconv"]["macs"])],
            ["SConv exported (lower → fold_masks → materialize)", f"{100 * acc['exported']:.2f}",
             f"{100 * (1 - acc['exported']):.2f}", human(c["exported"]["params"]), human(c["exported"]["macs"])]]
    lines.append(table(rows, ["model", "test acc %", "error %", "params", "MACs (1×1×28×28)"]))
    lines += ["", f"Paper ({PAPER['model']}, {PAPER['epochs']} epochs, full training set): error "
              f"{PAPER['baseline_error']} % → {PAPER['sconv_error']} %. The exported model's maximum deviation from the "
              f"SConv model on the verification inputs: {res['export_max_abs']:.2e}.", "",
              "## Training-step time (same run, same batches)", ""]
    st = res["step_time"]
    rows = [["whole run (median per step)", f"{1e3 * st['run']['baseline_median_s']:.1f}",
             f"{1e3 * st['run']['sconv_median_s']:.1f}", f"{st['run']['ratio']:.2f}"],
            ["final state, alternating micro-benchmark (min)", f"{st['final']['baseline']['min_ms']:.1f}",
             f"{st['final']['sconv']['min_ms']:.1f}", f"{st['final_ratio']:.2f}"]]
    if "compiled" in st:
        rows.append(["torch.compile (inductor), min", f"{st['compiled']['baseline']['min_ms']:.1f}",
                     f"{st['compiled']['sconv']['min_ms']:.1f}",
                     f"{st['compiled']['sconv']['min_ms'] / st['compiled']['baseline']['min_ms']:.2f}"])
    lines.append(table(rows, ["measure", "baseline ms", "SConv ms", "SConv / baseline (goal ≤ 1.3)"]))
    lines += ["", "Per epoch (median step ratio; slots de/re-allocated by that epoch's schedule call; what the "
              f"paper's per-call γ = {PAPER_GAMMA:g} would have closed at that point):", ""]
    lines.append(table([[e["epoch"], f"{100 * e['baseline']['train_accuracy']:.2f}", f"{100 * e['sconv']['train_accuracy']:.2f}",
                         f"{e['step_ratio']:.2f}", e.get("deallocated", "—"), e.get("reallocated", "—"), e["copies"],
                         e["closed"], e.get("would_close_at_paper_gamma", "—")] for e in res["log"]],
                       ["epoch", "baseline train acc %", "SConv train acc %", "step ratio", "dealloc", "realloc",
                        "copies", "closed", f"γ = {PAPER_GAMMA:g} would close"]))
    lines += ["", "## Inference latency (eval mode)", ""]
    lat = res["latency"]
    rows = []
    for b, r in lat.items():
        rows.append([b, f"{r['baseline']['min_ms']:.2f}", f"{r['sconv']['min_ms']:.2f}", f"{r['exported']['min_ms']:.2f}",
                     f"{r['sconv']['min_ms'] / r['exported']['min_ms']:.2f}×"])
    lines.append(table(rows, ["batch", "baseline ms (min)", "SConv training model ms", "exported ms",
                              "export speed-up vs SConv"]))
    lines += ["", "## Channel allocation per layer", "", f"![allocation]({res['plot']})", ""]
    lines.append(table([[r["layer"], r["kernel"], r["K"], r["slots"], r["own"], r["copies"], r["closed"],
                         r["ever_deallocated"], r["ever_reallocated"]] for r in res["layers"]],
                       ["layer", "kernel", "K", "slots", "own", "copies", "closed", "ever de-allocated",
                        "ever re-allocated"]))
    tot = res["totals"]
    lines += ["", f"Overall: {tot['closed']} of {tot['slots']} slots closed ({100 * tot['closed'] / tot['slots']:.1f} %), "
              f"{tot['copies']} re-allocated copies ({100 * tot['copies'] / tot['slots']:.1f} %); "
              f"{tot['ever_deallocated']} de-allocations and {tot['ever_reallocated']} re-allocations during training."]
    return "\n".join(lines) + "\n"


# -- main -----------------------------------------------------------------------------------

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny net, subset, 2 epochs")
    p.add_argument("--depth", type=int, default=22, help="densenet_cifar depth (4 + 6n; the paper: 40)")
    p.add_argument("--growth", type=int, default=12)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--shift-weight-decay", type=float, default=1e-5)
    p.add_argument("--gamma", type=float, default=None,
                   help="dealloc threshold per call (default: the paper's 1e-3 scaled to the number of calls)")
    p.add_argument("--train-limit", type=int, default=None, help="training images (default: fit --budget-min)")
    p.add_argument("--test-limit", type=int, default=None, help="test images (default: all 10000)")
    p.add_argument("--budget-min", type=float, default=18.0, help="wall-clock budget of the whole run, minutes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-repeats", type=int, default=8)
    p.add_argument("--latency-repeats", type=int, default=40)
    p.add_argument("--compile", action="store_true", help="also time the step under torch.compile (inductor)")
    a = p.parse_args(argv)
    if a.quick:
        a.depth, a.growth, a.epochs = 10, 6, 2
        a.train_limit = a.train_limit or 512
        a.test_limit = a.test_limit or 512
        a.step_repeats, a.latency_repeats = 2, 4
    calls = sum(1 for e in range(a.epochs) if e < 0.5 * a.epochs)
    a.gamma_reason = "--gamma" if a.gamma is not None else (
        f"the paper's γ = {PAPER_GAMMA:g} per call over {PAPER_CALLS} calls, spread over {calls}: "
        f"1 − (1 − {PAPER_GAMMA:g})^({PAPER_CALLS}/{calls})")
    if a.gamma is None:
        a.gamma = scaled_gamma(calls)
    return a


def init_distributed(args) -> None:
    """Under torchrun (``WORLD_SIZE`` > 1): a gloo process group, ``args.rank`` / ``args.world``, and
    only rank 0 prints. Otherwise one process (rank 0 of 1)."""
    args.world = int(os.environ.get("WORLD_SIZE", "1"))
    args.rank = 0
    if args.world > 1:
        if args.batch_size % args.world:
            raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {args.world} processes")
        dist.init_process_group("gloo")
        args.rank = dist.get_rank()
        if args.rank:
            sys.stdout = open(os.devnull, "w")          # rank 0 reports for everyone


def main(argv=None) -> dict:
    args = parse(argv)
    init_distributed(args)
    set_threads(args.threads)
    env = environment()
    t_all = time.perf_counter()
    full_train = fashion_mnist("train")
    test_set = fashion_mnist("test", limit=args.test_limit)
    if args.train_limit is not None:
        n_train, reason = min(args.train_limit, len(full_train)), "--train-limit"
    else:
        pair = calibrate_pair_step(args)
        reserve = 90.0 + 0.01 * len(test_set)           # evaluation, export, latency, micro-benchmarks
        budget = max(60.0, args.budget_min * 60 - reserve - (time.perf_counter() - t_all))
        steps = int(budget / (1.1 * pair) / args.epochs)
        n_train = max(args.batch_size, min(len(full_train), steps * args.batch_size))
        reason = (f"fits a {args.budget_min:g}-min budget: a baseline + SConv step pair took {pair:.2f} s in "
                  f"calibration")
        n_train, reason = gd.broadcast_object((n_train, reason), gd.resolve_group(), what="the training-set size")
    train_set = TensorDataset(*full_train[:n_train])
    print(f"training on {n_train} images ({reason}); testing on {len(test_set)}"
          + (f"; {args.world} processes, {args.batch_size // args.world} samples of every batch each"
             if args.world > 1 else ""), flush=True)
    test_loader = DataLoader(test_set, batch_size=256)

    run = train(args, train_set, test_loader)
    if args.world > 1:                # the rest (evaluation, export, timings) is rank 0's, in one process
        dist.destroy_process_group()
        if args.rank:
            return {}
    base, sconv = run["models"]["baseline"], run["models"]["sconv"]
    acc = {"baseline": loader_accuracy(base, test_loader), "sconv": loader_accuracy(sconv, test_loader)}
    example = (torch.randn(2, 1, 28, 28),)
    slim = graphsel.transform(sconv, ["lower_selective_conv", "fold_masks", "materialize"], example, progress=False)
    history = graphsel.graphsel_meta(slim).history
    export_dev = max(r.max_abs or 0.0 for r in history[-3:])
    acc["exported"] = loader_accuracy(slim, test_loader)
    assert not any(isinstance(m, sc.SelectiveConv2d) for m in slim.modules())
    one = (torch.randn(1, 1, 28, 28),)
    cost = {"baseline": graphsel.cost(base, one), "sconv": graphsel.cost(sconv.eval(), one),
            "exported": graphsel.cost(slim, one)}
    cost = {k: {"params": v.params, "macs": v.macs} for k, v in cost.items()}
    print(f"test accuracy: baseline {acc['baseline']:.4f}, sconv {acc['sconv']:.4f}, exported {acc['exported']:.4f}; "
          f"exported {human(cost['exported']['params'])} params / {human(cost['exported']['macs'])} MACs vs baseline "
          f"{human(cost['baseline']['params'])} / {human(cost['baseline']['macs'])}", flush=True)

    final = step_benchmark(base, sconv, args)
    st = run["step_times"]
    step_time = {"run": {"baseline_median_s": statistics.median(st["baseline"]),
                         "sconv_median_s": statistics.median(st["sconv"]),
                         "baseline_total_s": sum(st["baseline"]), "sconv_total_s": sum(st["sconv"])},
                 "final": final, "final_ratio": final["sconv"]["min_ms"] / final["baseline"]["min_ms"]}
    step_time["run"]["ratio"] = step_time["run"]["sconv_median_s"] / step_time["run"]["baseline_median_s"]
    if args.compile:
        step_time["compiled"] = compiled_step_benchmark(base, sconv, args)
    lat = latency({"baseline": base, "sconv": sconv, "exported": slim}, args)
    print(f"step time SConv / baseline: run {step_time['run']['ratio']:.2f}, final {step_time['final_ratio']:.2f}; "
          f"latency batch 1: sconv {lat['1']['sconv']['min_ms']:.2f} ms, exported {lat['1']['exported']['min_ms']:.2f} ms, "
          f"baseline {lat['1']['baseline']['min_ms']:.2f} ms", flush=True)

    layers = layer_table(sconv, run["schedule"])
    name = "sconv_fashion_mnist" + (f"_ddp{args.world}" if args.world > 1 else "")
    stem = result_stem(name, args.quick)
    plot_path = RESULTS / f"{stem}_allocation.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(layers, run["log"], plot_path)
    totals = {k: sum(r[k] for r in layers) for k in ("slots", "copies", "closed", "ever_deallocated", "ever_reallocated")}
    res = {"config": {**vars(args), "train_samples": n_train, "train_samples_reason": reason,
                      "test_samples": len(test_set)},
           "environment": env, "paper": PAPER, "accuracy": acc, "cost": cost, "export_max_abs": export_dev,
           "export_report": graphsel.report(slim), "step_time": step_time, "latency": lat, "layers": layers,
           "totals": totals, "log": run["log"], "train_seconds": run["train_seconds"],
           "schedule_epochs": sum(run["schedule"].active(e) for e in range(args.epochs)),
           "plot": plot_path.name, "wall_seconds": time.perf_counter() - t_all}
    js, md = write_results(name, res, markdown(res), quick=args.quick)
    print(f"wrote {js}, {md}, {plot_path} ({res['wall_seconds']:.0f} s)", flush=True)
    return res


if __name__ == "__main__":
    main()
