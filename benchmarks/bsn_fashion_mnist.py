"""Budgeted super networks trained for real: Fashion-MNIST, a gated ResNet fabric under budgets.

The super network is a ResNet fabric (``graphsel.passes.bsn.ResNetFabric``: 3 groups of
``--blocks`` residual nodes, widths ``--widths``, cross connections between groups; 1 input
channel, random initialisation). Per seed:

* ``super network``: the whole fabric trained without gates (the cost ceiling);
* ``bsn macs 25 % / 50 % / 75 %``: ``budget_gates`` on every residual branch (each fabric edge),
  trained with :class:`~graphsel.passes.bsn.BudgetedTrainer` under a MAC budget of that fraction of
  the super network's MACs (paper 004's count: conv + linear + one per BatchNorm output
  element), λ = 5 on the excess relative to the budget (:mod:`graphsel.passes.bsn.train` explains
  the scale and the tuning); the eval architecture is extracted with ``bsn_extract`` (verified equal to
  the gated model) and its BatchNorm statistics re-estimated on training batches (the running
  statistics were collected under sampled architectures);
* ``bsn steps n=2``: the same under the **distributed computation cost** (steps of greedy list
  scheduling on 2 parallel units), budget ``--steps-fraction`` of the super network's steps;
* ``thinned``: for every BSN run, a hand-thinned network of the same cost trained like the super
  network: for MACs the whole fabric with every width scaled by √(learned MACs / full MACs)
  (rounded, at least 1 channel), for steps the fabric's plain ResNet backbone (no cross
  connections) with the most nodes per group whose steps do not exceed the learned ones.

Reported: test accuracy, MACs, parameters and steps of every network, whether each learned eval
architecture meets its budget, the per-epoch cost trajectory (expected cost under the gate
distribution against the budget), and ``bsn_fashion_mnist_pareto.png``: accuracy against cost for
both seeds. Everything runs twice (``--seeds``, default 0 1).

Sizes (full run, 2 cores): the fabric ``--blocks 2 --widths 8 16 32`` (12 gated edges: 6 chain,
6 cross; 9.17 M MACs per 28×28 image, 16 steps on 2 units), 25 600 training images (the same for
every run), 4 epochs with 1 of warm-up without sampling (as the paper's first 50 of 300 epochs),
batch 128: 800 iterations per run, 600 of them sampling architectures — the simulation of the
gates' REINFORCE dynamics (``--simulate-lambda``) settles at the budgets within 300 — and the
whole test set (10 000 images). Eighteen trainings (per seed: the super network, 4 budgeted, 4
thinned, the thinned ones cheaper). Timing: the full run took 54 minutes (3 225 s) single-threaded on the
2-core AMD EPYC with another single-threaded benchmark on the second core (2026-12-07); a
budgeted run 200–220 s, the super network 195 s, a thinned network 50–200 s. The ``--quick``
smoke run (one seed, 1 024 images, 2 epochs of batch 32 without warm-up — 64 iterations, with the
logit learning rate raised to 0.3 so that the gates move at all — 1 000 test images) should take
1–2 minutes on an idle machine; its numbers say only that every stage runs.

Run: ``python -m benchmarks.bsn_fashion_mnist`` (full) or ``--quick``. Writes
``benchmarks/results/bsn_fashion_mnist{,_quick}.{json,md}`` and ``..._pareto.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):                       # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import graphsel
from benchmarks.train import loader_accuracy
from benchmarks.common import (RESULTS, decide, environment, environment_line, paired_difference, result_stem, set_threads,
                               table, write_results)
from graphsel.passes import bsn
from graphsel.tools.datasets import fashion_mnist

EXAMPLE = (torch.randn(1, 1, 28, 28),)


def fabric(args, widths=None, blocks=None, cross=True) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    return bsn.ResNetFabric(blocks or args.blocks, tuple(widths or args.widths), in_channels=1, num_classes=10,
                            cross=cross)


def costs_of(model: torch.nn.Module) -> dict:
    gm = model if isinstance(model, torch.fx.GraphModule) else graphsel.trace(model, EXAMPLE)
    cm = bsn.ArchitectureCost(gm, units=2)
    return {"macs": cm.eval_cost("macs"), "params": cm.eval_cost("params"), "steps": cm.eval_cost("steps")}


def recalibrate_bn(model: torch.nn.Module, train_set, batches: int, batch_size: int) -> None:
    """Re-estimate BatchNorm running statistics (cumulative average) on training batches."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(batches):
            model(train_set[i * batch_size:(i + 1) * batch_size][0])
    model.eval()


def optimizer_for(groups, args, steps):
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return opt, sched


def loader_for(train_set, args) -> DataLoader:
    gen = torch.Generator().manual_seed(args.seed)
    return DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen, drop_last=True)


def train_plain(name: str, model: torch.nn.Module, args, train_set, test_loader) -> dict:
    loader = loader_for(train_set, args)
    steps = args.epochs * len(loader)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt, sched = optimizer_for([{"params": decay, "weight_decay": args.weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}], args, steps)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - t0
    result = {"name": name, "kind": "plain", "accuracy": loader_accuracy(model, test_loader), "train_seconds": seconds,
              **costs_of(model)}
    print(f"[{name}] test accuracy {result['accuracy']:.4f}, MACs {result['macs'] / 1e6:.2f} M, steps "
          f"{result['steps']:.0f} ({seconds:.0f} s)", flush=True)
    return result


def train_bsn(name: str, cost: str, fraction: float, args, train_set, test_loader) -> dict:
    gm = graphsel.transform(fabric(args), ["budget_gates"], EXAMPLE)
    trainer = bsn.BudgetedTrainer(gm, fraction=fraction, cost=cost, units=2 if cost == "steps" else None)
    loader = loader_for(train_set, args)
    opt, sched = optimizer_for(trainer.param_groups(weight_decay=args.weight_decay, logit_lr=args.logit_lr), args,
                               args.epochs * len(loader))
    t0 = time.perf_counter()

    def show(r):
        print(f"[{name}] epoch {r['epoch']}/{args.epochs}: loss {r['task_loss']:.3f}, train acc "
              f"{r['train_accuracy']:.3f}, E[C] {r['expected_cost']:.3f} / budget {r['budget']:.3f} "
              f"(eval architecture {r['eval_cost']:.3f}){'' if r['sampling'] else ' [warm-up]'} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    log = trainer.fit(loader, opt, args.epochs, scheduler=sched, warmup_epochs=args.warmup_epochs,
                      progress=args.progress, on_epoch_end=show)
    seconds = time.perf_counter() - t0
    gm.eval()
    gated_accuracy = loader_accuracy(gm, test_loader)
    slim = graphsel.transform(gm, ["bsn_extract"], EXAMPLE)                      # verified equal to gm
    extracted = costs_of(slim)
    recalibrate_bn(slim, train_set, args.bn_batches, args.batch_size)
    budget = trainer.budget
    result = {"name": name, "kind": "bsn", "cost": cost, "fraction": fraction, "budget": budget,
              "lambda": trainer.lam, "accuracy": loader_accuracy(slim, test_loader), "accuracy_before_bn": gated_accuracy,
              "train_seconds": seconds, "log": log, **extracted,
              "full": trainer.full, "eval_cost": trainer.eval_cost(), "met": trainer.eval_cost() <= budget + 1e-9,
              "gates_on": sum(1 for _, g in bsn.gates(gm) if g.is_on), "gates": len(bsn.gates(gm)),
              "gate_probabilities": {n: round(float(g.probability), 4) for n, g in bsn.gates(gm)}}
    print(f"[{name}] test accuracy {result['accuracy']:.4f} (before BN re-estimation {gated_accuracy:.4f}), "
          f"{cost} {result['eval_cost']:.4g} ≤ budget {budget:.4g}: {result['met']}; {result['gates_on']}/"
          f"{result['gates']} edges kept ({seconds:.0f} s)", flush=True)
    return result


def thinned_for(run: dict, full: dict, args):
    """A hand-thinned network of the learned architecture's cost (see the module docstring)."""
    if run["cost"] == "steps":
        best = None
        for n in range(1, args.blocks + 1):
            m = fabric(args, blocks=n, cross=False)
            if costs_of(m)["steps"] <= run["steps"]:
                best = (n, m)
        n, m = best if best is not None else (1, fabric(args, blocks=1, cross=False))
        return f"thinned (ResNet backbone, {n} nodes per group)", m
    scale = math.sqrt(run["macs"] / full["macs"])
    widths = [max(1, round(w * scale)) for w in args.widths]
    return f"thinned (widths {'/'.join(map(str, widths))})", fabric(args, widths=widths)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = results["seed_runs"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"super": ("k", "s", "super network"), "bsn": ("#d95f02", "o", "BSN (learned)"),
              "thinned": ("#7570b3", "^", "hand-thinned")}
    for ax, cost, unit, scale in ((axes[0], "macs", "MMACs", 1e6), (axes[1], "steps", "steps on 2 units", 1)):
        shown = set()
        for r in runs:
            group = "super" if r["name"] == "super network" else ("bsn" if r["kind"] == "bsn" else "thinned")
            if cost == "macs" and r.get("cost") == "steps" or cost == "steps" and r.get("cost") == "macs":
                continue
            if group == "thinned" and r.get("for_cost") not in (None, cost):
                continue
            colour, marker, label = styles[group]
            ax.scatter(r[cost] / scale, 100 * r["accuracy"], c=colour, marker=marker,
                       label=label if group not in shown else None, s=36, alpha=0.85)
            shown.add(group)
            if group == "bsn":
                ax.axvline(r["budget"] / scale, color=colour, linestyle=":", linewidth=0.8)
        ax.set_xlabel(f"{unit} (dotted: budgets)")
        ax.set_ylabel("test accuracy %")
        ax.set_title("MAC budgets 25/50/75 %" if cost == "macs" else "distributed cost, n = 2", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    seeds = sorted({r["seed"] for r in runs})
    fig.suptitle(f"BSN on Fashion-MNIST: accuracy against cost (seed{'s' if len(seeds) > 1 else ''} "
                 f"{', '.join(map(str, seeds))})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict) -> str:
    a = results["config"]
    lines = [f"# BSN on Fashion-MNIST (ResNet fabric, {a['blocks']} nodes per group, widths "
             f"{'/'.join(map(str, a['widths']))}{', quick smoke run' if a['quick'] else ''})", "",
             environment_line(results["environment"]), "",
             f"{a['train_samples']} training images, {a['epochs']} epochs ({a['warmup_epochs']} warm-up without "
             f"sampling), batch {a['batch_size']}, SGD (Nesterov 0.9, cosine from {a['lr']}, weight decay "
             f"{a['weight_decay']}; gate logits lr {a['logit_lr']}); test on {a['test_samples']} images; seeds "
             f"{', '.join(map(str, a['seeds']))}. MACs: paper 004's count (conv + linear + BatchNorm elements).", ""]
    rows = []
    for r in results["seed_runs"]:
        budget = (f"{r['fraction']:.0%} = {r['budget'] / 1e6:.2f} M" if r.get("cost") == "macs" else
                  f"{r['fraction']:.0%} = {r['budget']:.1f} steps" if r.get("cost") == "steps" else "—")
        rows.append([r["seed"], r["name"], f"{100 * r['accuracy']:.2f}", f"{r['macs'] / 1e6:.2f}",
                     f"{r['params'] / 1e3:.1f}", f"{r['steps']:.0f}", budget,
                     ("yes" if r["met"] else "**no**") if "met" in r else "—",
                     f"{r['gates_on']}/{r['gates']}" if "gates" in r else "—", f"{r['train_seconds']:.0f}"])
    lines.append(table(rows, ["seed", "network", "test acc %", "MMACs", "params k", "steps (n=2)", "budget",
                              "budget met", "edges kept", "train s"]))
    bsn_runs = [r for r in results["seed_runs"] if r["kind"] == "bsn"]
    if bsn_runs:
        met = sum(r["met"] for r in bsn_runs)
        lines += ["", f"Budgets met by the learned eval architectures: **{met} of {len(bsn_runs)}**."]
        names = list(dict.fromkeys(r["name"] for r in results["seed_runs"] if r["kind"] == "bsn"))
        summary = []
        for name in names:
            rs = [r for r in bsn_runs if r["name"] == name]
            th = [r for r in results["seed_runs"] if r.get("thinned_for") == name]
            acc = [100 * r["accuracy"] for r in rs]
            tacc = [100 * r["accuracy"] for r in th]
            summary.append([name, f"{statistics.mean(acc):.2f}", f"{statistics.mean(tacc):.2f}" if tacc else "—",
                            f"{statistics.mean(r['eval_cost'] / r['full'] for r in rs):.3f}"])
        lines += ["", "Mean over seeds:", "", table(summary, ["budget", "BSN acc %", "thinned acc %",
                                                            "learned cost / super network"])]
        lines += ["", "The paper's claim, a learned architecture is more accurate than a hand-designed one of the "
                  "same cost: paired difference BSN − thinned (same seed) in accuracy points, 95 % t-interval; "
                  "`reproduced` if it lies above 0, `not reproduced` if below, `undecided` otherwise.", "",
                  table([claim_row(name, results["seed_runs"]) for name in names],
                        ["budget", "per seed", "mean", "95 % CI", "status"])]
    lines += ["", f"Accuracy against cost: ![pareto]({results['plot']})", ""]
    for r in bsn_runs[: len(names) if bsn_runs else 0]:
        lines += [f"Cost trajectory, {r['name']} (seed {r['seed']}; costs as fractions of the super network):", ""]
        lines.append(table([[e["epoch"], "no" if not e["sampling"] else "yes", f"{e['sampled_cost']:.3f}",
                             f"{e['expected_cost']:.3f}", f"{e['eval_cost']:.3f}", f"{e['budget']:.3f}",
                             f"{100 * e['train_accuracy']:.2f}"] for e in r["log"]],
                           ["epoch", "sampling", "mean sampled cost", "E[C]", "eval architecture", "budget",
                            "train acc %"]))
        lines.append("")
    return "\n".join(lines) + "\n"


def claim_row(name: str, runs: list[dict]) -> list:
    acc = {r["seed"]: 100 * r["accuracy"] for r in runs if r["name"] == name}
    thin = {r["seed"]: 100 * r["accuracy"] for r in runs if r.get("thinned_for") == name}
    d = paired_difference(acc, thin)
    ci = f"[{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]" if d["ci"] else "—"
    return [name, " / ".join(f"{x:+.2f}" for x in d["diffs"]), f"{d['mean']:+.2f}" if d["diffs"] else "—", ci,
            f"**{decide(d['ci'])}**"]


def simulate_lambda(args, lambdas=(1.0, 2.0, 5.0, 10.0), lrs=(0.1, 0.05), iters: int = 300, seeds=(0, 1)) -> list:
    """The REINFORCE dynamics of the gate logits alone, over the fabric's real cost model: per-gate
    task-loss effects drawn from U(0.02, 0.3), per-sample noise 0.7, batch 128, SGD with momentum
    0.9 (the source of ``DEFAULT_LAMBDA``'s tuning; ``--simulate-lambda`` prints the table)."""
    import numpy as np
    gm = graphsel.transform(fabric(args), ["budget_gates"], EXAMPLE, verify=False)
    cm = bsn.ArchitectureCost(gm, units=2)
    g = cm.n_gates
    plan = [(b, "macs") for b in args.budgets] + [(args.steps_fraction, "steps")]
    rows = []
    for lam in lambdas:
        for lr in lrs:
            row = [lam, lr]
            for frac, kind in plan:
                finals = []
                for seed in seeds:
                    rng = np.random.default_rng(seed)
                    delta = rng.uniform(0.02, 0.3, g)
                    full = cm.full_cost(kind, 2)
                    a = torch.full((g,), bsn.INIT_LOGIT, requires_grad=True)
                    opt = torch.optim.SGD([a], lr=lr, momentum=0.9, nesterov=True)
                    for _ in range(iters):
                        H = rng.random((128, g)) < torch.sigmoid(a.detach()).numpy()
                        c = cm.of(H, kind, 2) / full
                        r = 0.5 + ((~H) * delta).sum(1) + 0.7 * rng.standard_normal(128) \
                            + lam * np.maximum(0, c - frac) / frac
                        r = torch.tensor(r, dtype=torch.float32)
                        h = torch.tensor(H, dtype=torch.float32)
                        logp = (h * F.logsigmoid(a) + (1 - h) * F.logsigmoid(-a)).sum(1)
                        opt.zero_grad()
                        ((r - r.mean()) * logp).mean().backward()
                        opt.step()
                    finals.append(cm.of((a.detach() > 0).numpy()[None], kind, 2)[0] / full)
                row.append(" / ".join(f"{v:.2f}{'' if v <= frac + 1e-9 else '!'}" for v in finals))
            rows.append(row)
    headers = ["λ", "logit lr"] + [f"{k} {f:.0%}" for f, k in plan]
    print("eval-architecture cost / super network after the simulation (seeds " + ", ".join(map(str, seeds))
          + "; ! = over budget)\n" + table(rows, headers))
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1024 images, two epochs of batch 32, one seed, logit learning rate 0.3")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--steps-fraction", type=float, default=0.75,
                    help="budget of the distributed-cost run, as a fraction of the super network's steps on 2 units")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--warmup-epochs", type=int, default=1)
    ap.add_argument("--train-samples", type=int, default=25600)
    ap.add_argument("--test-samples", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--logit-lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--bn-batches", type=int, default=20, help="training batches for the BN re-estimation")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (--quick: 0)")
    ap.add_argument("--progress", action="store_true", help="show tqdm progress bars")
    ap.add_argument("--simulate-lambda", action="store_true",
                    help="only simulate the gate logits' REINFORCE dynamics for several λ (seconds) and print them")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the markdown and the plot from the existing results JSON (no training)")
    args = ap.parse_args(argv)
    if args.render:
        stem = result_stem("bsn_fashion_mnist", args.quick)
        results = json.loads((args.out / f"{stem}.json").read_text())
        plot(results, args.out / results["plot"])
        js, md = write_results("bsn_fashion_mnist", results, markdown(results), args.out, quick=args.quick)
        print(f"rewrote {md} and {results['plot']} from {js}")
        return results
    if args.quick:
        args.epochs, args.warmup_epochs, args.train_samples, args.test_samples = 2, 0, 1024, 1000
        args.batch_size, args.bn_batches, args.logit_lr = 32, 8, 0.3
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1]
    set_threads(args.threads)
    if args.simulate_lambda:
        args.seed = args.seeds[0]
        return {"simulation": simulate_lambda(args)}
    train_set = fashion_mnist("train", limit=args.train_samples)
    test_loader = DataLoader(fashion_mnist("test", limit=args.test_samples), batch_size=500)
    results = {"config": {**{k: v for k, v in vars(args).items() if k not in ("out", "seed")}, "quick": args.quick},
               "environment": environment(), "seed_runs": []}
    t_start = time.perf_counter()
    for seed in args.seeds:
        args.seed = seed
        full = train_plain("super network", fabric(args), args, train_set, test_loader)
        runs = [full]
        plan = [(f"bsn macs {b:.0%}", "macs", b) for b in args.budgets] + \
               [(f"bsn steps n=2 {args.steps_fraction:.0%}", "steps", args.steps_fraction)]
        for name, cost, fraction in plan:
            run = train_bsn(name, cost, fraction, args, train_set, test_loader)
            runs.append(run)
            tname, model = thinned_for(run, full, args)
            thin = train_plain(tname, model, args, train_set, test_loader)
            thin["thinned_for"], thin["for_cost"] = name, cost
            runs.append(thin)
        for r in runs:
            r["seed"] = seed
        results["seed_runs"].extend(runs)
    results["total_seconds"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"{result_stem('bsn_fashion_mnist', args.quick)}_pareto.png"
    results["plot"] = png.name
    plot(results, png)
    js, md = write_results("bsn_fashion_mnist", results, markdown(results), args.out, quick=args.quick)
    print(f"wrote {js}, {md} and {png} ({results['total_seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
