"""Selective convolution against its paper's claims: Fashion-MNIST at CPU scale, six arms, several seeds.

**The claim** (papers 000/001, ICML 2019; the slides' table): at equal parameters, training with
selective convolution (dealloc → realloc with learned spatial shifts) lowers the test error —
DenseNet-40 (bottleneck, k = 12) on Fashion-MNIST 5.03 ± 0.07 → 4.73 ± 0.06 % after 300 epochs
on the full training set. Realloc exists because "naively copying a channel in does NOT give any
benefit" (the copies need their shift), and selectivity is meant to use parameters better than a
static layer allocation.

**Arms** (for every seed: the same initialisation — ``torch.manual_seed(seed)`` before the network
is built, SConv insertion is exact — the same data order and the same augmentation draws):

* ``baseline`` — the plain DenseNet;
* ``paper_gamma`` — SConv with the paper's γ = 1e-3 per dealloc call;
* ``scaled_gamma`` — SConv with γ scaled to the number of calls (below);
* ``dealloc_only`` — scaled γ, realloc off (``SelectiveSchedule(realloc=False)``): training only prunes;
* ``shifts_frozen`` — scaled γ, shifts not learned (``SelectiveSchedule(train_shifts=False)``): each
  copy keeps its U(−1.5, 1.5)² draw;
* ``static_matched`` — the baseline with every conv at the width of this seed's ``scaled_gamma``
  export (graphsel ``prune`` with per-conv ``ratios`` at initialisation, L1 — on random weights an
  arbitrary choice — then ``fold_masks`` → ``materialize``), trained with the same recipe: a static
  network of the same parameter count (the export's fixed shift kernels aside).

SConv arms are evaluated as exported (``lower_selective_conv → fold_masks → materialize``, verified
exact by the pipeline); ``params`` and ``macs`` are the export's (``graphsel.cost``, 1×1×28×28).

**Recipe** (paper 000, B.1/B.2): SGD with Nesterov momentum 0.9, cosine learning rate from 0.1 to
0 per iteration, weight decay 1e-4 on every parameter except the shifts (1e-5), batch 128,
random translation up to 4 px and horizontal flip, images normalised with the training set's
mean and sd; dealloc → realloc during the first half of training; K = 3 for 1×1 convs, 0 for
3×3 (prune only).

**Sizes and constants** (full mode; each chosen to fit 2 CPU cores and ≤ 60 minutes):

* the full 60 000 / 10 000 images; 3 seeds (0, 1, 2) × 6 arms = 18 training runs;
* ``densenet_cifar(16, growth 8)``: the paper's architecture (bottleneck units, no transition
  convs), 2 units per block instead of 6 and k = 8 instead of 12 — 22.5 k parameters and 6.5 M MACs
  at 28×28 against DenseNet-40's 0.21 M; 12 selective convs (6 of them 3×3);
* 3 epochs (1 404 iterations): the paper trains 300;
* dealloc → realloc every quarter epoch (``--periods-per-epoch 4``, 117 iterations) during the
  first half: 6 calls. The paper calls once per epoch (469 iterations on Fashion-MNIST at batch
  128) for 150 epochs; one call per epoch would give one or two calls here, too few to see
  re-allocation at work, so the calls are denser than the paper's;
* **scaled γ** = 1 − (1 − 10⁻³)^(150 / calls) = 0.0247 for 6 calls. One dealloc call closes slots
  whose accumulated normalised damage is ≤ γ for every output channel; the next call renormalises
  over the slots still open, so C calls can close at most 1 − (1 − γ)^C of a layer's damage mass.
  The scaled γ gives 6 calls the paper's total budget over its 150 calls (1 − 0.999¹⁵⁰ = 13.9 %).
  At γ = 1e-3 a short run closes almost nothing (the ``paper_gamma`` arm shows how much);
* the per-iteration time estimated before the run is printed; the whole run (18 trainings, 12
  exports, evaluations) was sized at about 40–50 minutes on a quiet 2-core machine; measured on
  the EPYC (2026-12-07) single-threaded beside other single-threaded benchmarks: 149 min, 6–11 min
  per training — a quiet two-thread run has not been timed, and the sizing may be optimistic.

**Statistics and the decision rule**: per arm, mean ± sd of the test accuracy over seeds; per
claim, the paired difference (method − reference, same seed) in accuracy points, its mean and
95 % confidence interval (Student's t, n − 1 degrees of freedom). A claim that the method is
better is ``reproduced`` when the interval lies above 0, ``not reproduced`` when it lies below
0, ``undecided`` when it contains 0 (:func:`benchmarks.common.decide`).

Run: ``python -m benchmarks.sconv_fidelity`` (full) or ``--quick`` (a smoke test of every arm and
the statistics: tiny net, 512 images, 2 epochs, 3 seeds, γ = 0.15 for the scaled arms so that the
smoke run closes and re-allocates slots; 1–3 minutes). A run can be split by seeds: ``--seeds 0``,
then ``--seeds 1 --append``, ... (``--append`` keeps the other seeds' runs of the results file). Writes
``benchmarks/results/sconv_fidelity{,_quick}.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):                       # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn as nn

import graphsel
from benchmarks.common import (RESULTS, decide, environment, environment_line, human, mean_sd, paired_difference,
                               previous_runs, result_stem, set_threads, table, write_results)
from benchmarks.sconv_fashion_mnist import PAPER_GAMMA, scaled_gamma
from benchmarks.train import count_params, evaluate, tensors, train
from graphsel.passes import selective_conv as sc
from graphsel.tools.datasets import fashion_mnist
from graphsel.tools.models import densenet_cifar

PAPER = {"model": "DenseNet-40 (bottleneck, k = 12)", "dataset": "Fashion-MNIST", "epochs": 300,
         "baseline_error": (5.03, 0.07), "sconv_error": (4.73, 0.06), "params": "0.21M"}
ARMS = ("baseline", "paper_gamma", "scaled_gamma", "dealloc_only", "shifts_frozen", "static_matched")
SCONV_ARMS = ("paper_gamma", "scaled_gamma", "dealloc_only", "shifts_frozen")
# the settings an --append run must share with the results file it extends
SETTINGS = ("depth", "growth", "epochs", "periods_per_epoch", "batch_size", "lr", "weight_decay",
            "shift_weight_decay", "scaled_gamma", "train_samples", "test_samples", "no_augment")

# (claim, method arm, reference arm, threshold in accuracy points: the method's accuracy minus the
#  reference's must exceed it)
CLAIMS = [
    ("SConv at the paper's γ = 1e-3 lowers the test error against the baseline at equal parameters "
     "(paper: DenseNet-40 on Fashion-MNIST, 5.03 → 4.73 % error)", "paper_gamma", "baseline", 0.0),
    ("SConv at the scaled γ lowers the test error against the baseline", "scaled_gamma", "baseline", 0.0),
    ("Re-allocation adds to de-allocation (SConv beats dealloc only)", "scaled_gamma", "dealloc_only", 0.0),
    ("Learned spatial shifts matter (SConv beats frozen shifts)", "scaled_gamma", "shifts_frozen", 0.0),
    ("Selective allocation beats a static network of the same parameter count", "scaled_gamma", "static_matched",
     0.0),
]


# -- one arm ----------------------------------------------------------------------------------

def build_baseline(args, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return densenet_cifar(args.depth, args.growth, in_channels=1, num_classes=10)


def conv_widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def static_matched(base: nn.Module, target_widths: dict[str, int]) -> tuple[nn.Module, dict[str, float]]:
    """``base`` with every conv narrowed to ``target_widths`` (a SConv export's), pruned at initialisation."""
    ratios = {}
    for path, width in conv_widths(base).items():
        target = target_widths.get(path, width)
        if target < width:
            ratios[path] = (width - target + 0.5) / width         # prune removes floor(ratio · width)
    if not ratios:
        return base, ratios
    slim = graphsel.transform(base, [("prune", {"ratio": 0.0, "ratios": ratios, "scope": "uniform"}), "fold_masks",
                                     "materialize"], torch.randn(2, 1, 28, 28), progress=False, verify=False)
    return slim, ratios


def run_arm(arm: str, seed: int, args, data: dict, targets: dict) -> dict:
    """Train and evaluate one arm for one seed."""
    base = build_baseline(args, seed)
    one = torch.randn(1, 1, 28, 28)
    record: dict = {"arm": arm, "seed": seed}
    schedule = None
    calls: list[dict] = []
    per_epoch = len(data["train"][1]) // args.batch_size
    per_period = max(1, per_epoch // args.periods_per_epoch)
    periods = args.epochs * args.periods_per_epoch
    if arm in ("baseline", "static_matched"):
        model = base
        if arm == "static_matched":
            model, ratios = static_matched(base, targets[seed]["widths"])
            record["pruned_ratios"] = ratios
            record["target_params"] = targets[seed]["params"]
    else:
        gamma = PAPER_GAMMA if arm == "paper_gamma" else args.scaled_gamma
        model = graphsel.transform(copy.deepcopy(base), [("insert_selective_conv", {"gamma": gamma})],
                                   torch.randn(2, 1, 28, 28), progress=False)
        record["gamma"] = gamma
    opt = torch.optim.SGD(sc.param_groups(model, args.weight_decay, args.shift_weight_decay), lr=args.lr,
                          momentum=0.9, nesterov=True)
    if arm in SCONV_ARMS:
        schedule = sc.SelectiveSchedule(model, periods, optimizer=opt, seed=seed, realloc=arm != "dealloc_only",
                                        train_shifts=arm != "shifts_frozen")
        record["variant"] = schedule.variant

    def after_step(step: int) -> None:
        if schedule is None or (step + 1) % per_period:
            return
        period = (step + 1) // per_period - 1
        if period >= periods:
            return
        rec = schedule.on_epoch_end(period)
        if rec is not None:
            alloc = sc.allocation(model)
            calls.append({"call": len(calls) + 1, "step": step + 1, "epoch": step // per_epoch + 1,
                          "deallocated": rec.deallocated, "reallocated": rec.reallocated, "recycled": rec.recycled,
                          "closed": sum(a.closed for a in alloc), "copies": sum(a.copies for a in alloc)})

    run = train(model, opt, data["train"], epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                augmentation=not args.no_augment, after_step=after_step, label=f"{arm} seed {seed}",
                verbose=args.verbose)
    record.update(train_seconds=run["train_seconds"], log=run["log"], params_training=count_params(model))
    t0 = time.perf_counter()
    if schedule is not None:
        slots = sum(a.slots for a in sc.allocation(model))
        alloc = sc.allocation(model)
        record.update(slots=slots, closed=sum(a.closed for a in alloc), copies=sum(a.copies for a in alloc),
                      calls=calls, churn=churn_per_epoch(calls, args.epochs),
                      totals={k: sum(t[k] for t in schedule.totals.values()) for k in ("deallocated", "reallocated",
                                                                                        "recycled")})
        model.eval()
        slim = graphsel.transform(model, ["lower_selective_conv", "fold_masks", "materialize"],
                                  (torch.randn(2, 1, 28, 28),), progress=False)
        history = graphsel.graphsel_meta(slim).history
        record["export_max_abs"] = max((r.max_abs or 0.0) for r in history[-3:])
        final = slim
    else:
        final = model
    record["test_acc"] = evaluate(final, data["test"])
    cost = graphsel.cost(final.eval(), one)
    record.update(params=cost.params, macs=cost.macs, eval_seconds=time.perf_counter() - t0)
    if arm == "scaled_gamma":
        targets[seed] = {"widths": conv_widths(final), "params": cost.params}
    print(f"{arm:>14} seed {seed}: test acc {100 * record['test_acc']:.2f} %, params {record['params']}, MACs "
          f"{human(record['macs'])}" + (f", closed {record['closed']}/{record['slots']}, copies {record['copies']}"
                                         if schedule is not None else "")
          + f" ({record['train_seconds']:.0f} s)", flush=True)
    return record


def churn_per_epoch(calls: list[dict], epochs: int) -> list[dict]:
    """Per epoch: slots de-allocated, re-allocated and recycled (copies closed again) by that epoch's calls,
    and the closed slots and copies after its last call."""
    out = []
    for e in range(1, epochs + 1):
        mine = [c for c in calls if c["epoch"] == e]
        if not mine:
            continue
        out.append({"epoch": e, "calls": len(mine), **{k: sum(c[k] for c in mine) for k in
                                                        ("deallocated", "reallocated", "recycled")},
                    "closed": mine[-1]["closed"], "copies": mine[-1]["copies"]})
    return out


# -- statistics -------------------------------------------------------------------------------

def by_arm(runs: list[dict], arm: str, key: str = "test_acc") -> dict[int, float]:
    return {r["seed"]: r[key] for r in runs if r["arm"] == arm}


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for arm in ARMS:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        m, s = mean_sd([100 * r["test_acc"] for r in rs])
        rows.append({"arm": arm, "seeds": [r["seed"] for r in rs], "acc_mean": m, "acc_sd": s,
                     "acc": [100 * r["test_acc"] for r in rs], "params_mean": statistics.mean(r["params"] for r in rs),
                     "macs_mean": statistics.mean(r["macs"] for r in rs),
                     "closed_mean": statistics.mean(r["closed"] for r in rs) if "closed" in rs[0] else None,
                     "copies_mean": statistics.mean(r["copies"] for r in rs) if "copies" in rs[0] else None})
    return rows


def claims(runs: list[dict]) -> list[dict]:
    out = []
    for text, method, ref, threshold in CLAIMS:
        a = {k: 100 * v for k, v in by_arm(runs, method).items()}
        b = {k: 100 * v for k, v in by_arm(runs, ref).items()}
        d = paired_difference(a, b)
        out.append({"claim": text, "status": decide(d["ci"], threshold), "method": method, "reference": ref,
                    "threshold_points": threshold, "difference_points": d["mean"], "sd_points": d["sd"],
                    "ci95_points": d["ci"], "n_seeds": d["n"], "per_seed_points": d["diffs"]})
    return out


# -- report -----------------------------------------------------------------------------------

def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = res["runs"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, arm in enumerate(ARMS):
        acc = [100 * r["test_acc"] for r in runs if r["arm"] == arm]
        if not acc:
            continue
        ax.scatter([i] * len(acc), acc, color="#999999", s=14, zorder=2)
        m, s = mean_sd(acc)
        ax.errorbar([i], [m], yerr=[s], fmt="o", color="#d95f02" if arm in SCONV_ARMS else "#1b9e77", capsize=4,
                    zorder=3)
    ax.set_xticks(range(len(ARMS)))
    ax.set_xticklabels(ARMS, rotation=25, fontsize=8)
    ax.set_ylabel("test accuracy % (mean ± sd; grey: seeds)")
    ax.set_title("SConv arms on Fashion-MNIST", fontsize=9)
    for arm, colour in (("scaled_gamma", "#d95f02"), ("dealloc_only", "#7570b3"), ("shifts_frozen", "#e7298a"),
                        ("paper_gamma", "#66a61e")):
        rs = [r for r in runs if r["arm"] == arm and r.get("calls")]
        if not rs:
            continue
        n = max(len(r["calls"]) for r in rs)
        xs = list(range(1, n + 1))
        for key, style in (("deallocated", "-"), ("reallocated", "--"), ("recycled", ":")):
            ys = [statistics.mean(r["calls"][i][key] for r in rs if len(r["calls"]) > i) for i in range(n)]
            ax2.plot(xs, ys, style, color=colour, label=f"{arm}: {key}")
    ax2.set_xlabel("dealloc → realloc call")
    ax2.set_ylabel("slots (mean over seeds)")
    ax2.set_title("Slot churn per call: closed, re-opened as copies, copies closed again", fontsize=9)
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt_ci(ci) -> str:
    return "—" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def markdown(res: dict) -> str:
    a = res["config"]
    lines = [f"# Selective convolution: fidelity to the paper's claims{' (quick smoke run)' if a['quick'] else ''}", "",
             environment_line(res["environment"]), "",
             f"densenet_cifar({a['depth']}, k = {a['growth']}) on Fashion-MNIST: {a['train_samples']} training / "
             f"{a['test_samples']} test images, {a['epochs']} epochs, batch {a['batch_size']}, SGD Nesterov 0.9, cosine lr "
             f"from {a['lr']}, weight decay {a['weight_decay']} (shifts {a['shift_weight_decay']}), "
             f"{'no augmentation' if a['no_augment'] else 'translation ±4 px + flip'}; dealloc → realloc every "
             f"{res['iterations_per_call']} iterations in the first half ({res['calls']} calls); scaled γ = "
             f"{a['scaled_gamma']:.4g} ({a['gamma_reason']}). Seeds {', '.join(map(str, a['seeds']))}. "
             f"Paper: {PAPER['model']}, {PAPER['epochs']} epochs, error {PAPER['baseline_error'][0]} ± "
             f"{PAPER['baseline_error'][1]} → {PAPER['sconv_error'][0]} ± {PAPER['sconv_error'][1]} %.", "",
             f"Wall time {res['wall_seconds'] / 60:.1f} min (estimated beforehand: {res['estimate_seconds'] / 60:.1f} min).",
             "", "## Claims", "",
             "Paired differences (method − reference, same seed) in test-accuracy points, 95 % CI (Student's t). "
             "Rule: `reproduced` if the CI lies above the threshold, `not reproduced` if below, `undecided` otherwise.", ""]
    lines.append(table([[c["claim"], f"{c['method']} − {c['reference']}",
                         "—" if c["difference_points"] is None else f"{c['difference_points']:+.2f}",
                         fmt_ci(c["ci95_points"]), f"{c['threshold_points']:+g}", f"**{c['status']}**"]
                        for c in res["claims"]], ["claim", "difference", "mean (points)", "95 % CI", "threshold",
                                                  "status"]))
    lines += ["", "## Arms", ""]
    lines.append(table([[s["arm"], " / ".join(f"{v:.2f}" for v in s["acc"]), f"{s['acc_mean']:.2f} ± {s['acc_sd']:.2f}",
                         f"{100 - s['acc_mean']:.2f}", human(s["params_mean"]), human(s["macs_mean"]),
                         "—" if s["closed_mean"] is None else f"{s['closed_mean']:.1f}",
                         "—" if s["copies_mean"] is None else f"{s['copies_mean']:.1f}"] for s in res["summary"]],
                       ["arm", "test acc % per seed", "mean ± sd", "error %", "params (export)", "MACs (export)",
                        "closed slots", "copies"]))
    sl = [r for r in res["runs"] if r.get("slots")]
    if sl:
        lines += ["", f"Selective slots per model: {sl[0]['slots']}. Export deviation from the SConv model (max over "
                  f"runs): {max(r['export_max_abs'] for r in sl):.1e}."]
    lines += ["", "## Slot churn per epoch (mean over seeds)", "",
              "de-allocated: slots closed by that epoch's calls; re-allocated: re-opened as shifted copies; recycled: "
              "copies made by an earlier call and closed again (churn); closed / copies: after the epoch's last call.", ""]
    rows = []
    for arm in SCONV_ARMS:
        rs = [r for r in res["runs"] if r["arm"] == arm]
        epochs = sorted({c["epoch"] for r in rs for c in r.get("churn", [])})
        for e in epochs:
            cs = [c for r in rs for c in r["churn"] if c["epoch"] == e]
            rows.append([arm, e, cs[0]["calls"]] + [f"{statistics.mean(c[k] for c in cs):.1f}" for k in
                                                     ("deallocated", "reallocated", "recycled", "closed", "copies")])
    lines.append(table(rows, ["arm", "epoch", "calls", "de-allocated", "re-allocated", "recycled", "closed", "copies"]))
    sm = [r for r in res["runs"] if r["arm"] == "static_matched"]
    if sm:
        lines += ["", "static_matched against its target (the scaled-γ export of the same seed): params "
                  + ", ".join(f"{r['params']} vs {r['target_params']}" for r in sm)
                  + " (the difference is the export's fixed shift kernels and gathers)."]
    lines += ["", f"![arms and churn]({res['plot']})", ""]
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------------

def estimate(args, n_train: int) -> float:
    """Seconds the run should take, from a few timed steps of a baseline and a SConv model (25 % copies)."""
    base = build_baseline(args, 0)
    model = graphsel.transform(copy.deepcopy(base), ["insert_selective_conv"], torch.randn(2, 1, 28, 28),
                               progress=False)
    sc.randomize_state(model, p_closed=0.0, p_copy=0.25)
    x, y = torch.randn(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,))
    times = {}
    for name, m in (("base", base), ("sconv", model)):
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        m.train()
        ts = []
        for _ in range(4):
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ts.append(time.perf_counter() - t0)
        times[name] = min(ts[1:])
    steps = args.epochs * (n_train // args.batch_size)
    per_seed = steps * (4 * times["sconv"] + 2 * times["base"]) * 1.1 + 4 * 6 + 0.0015 * args.test_samples * 6
    return per_seed * len(args.seeds)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny net, 512 images, 2 epochs")
    p.add_argument("--depth", type=int, default=16, help="densenet_cifar depth (4 + 6n; the paper: 40)")
    p.add_argument("--growth", type=int, default=8, help="growth rate k (the paper: 12)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--periods-per-epoch", type=int, default=4, help="dealloc → realloc calls per epoch (first half)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--shift-weight-decay", type=float, default=1e-5)
    p.add_argument("--scaled-gamma", type=float, default=None, help="default: 1 − (1 − 1e-3)^(150 / calls)")
    p.add_argument("--train-samples", type=int, default=60000)
    p.add_argument("--test-samples", type=int, default=10000)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget-min", type=float, default=60.0,
                   help="warn when the estimated run time exceeds this (the full run is sized for a quiet 2-core machine)")
    p.add_argument("--append", action="store_true",
                   help="keep the runs of other seeds from the existing results file (a run split by --seeds)")
    p.add_argument("--verbose", action="store_true", help="print every epoch")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if a.quick:
        a.depth, a.growth, a.epochs = 10, 6, 2
        a.train_samples, a.test_samples = min(a.train_samples, 512), min(a.test_samples, 500)
    if a.seeds is None:
        a.seeds = [0, 1, 2]
    if "static_matched" in a.arms and "scaled_gamma" not in a.arms:
        p.error("static_matched needs scaled_gamma (it copies that export's widths)")
    a.arms = [arm for arm in ARMS if arm in a.arms]                 # scaled_gamma before static_matched
    periods = a.epochs * a.periods_per_epoch
    a.calls = sum(1 for e in range(periods) if e < 0.5 * periods)
    if a.scaled_gamma is not None:
        a.gamma_reason = "--scaled-gamma"
    elif a.quick:                                    # a smoke run should close and re-allocate slots
        a.scaled_gamma, a.gamma_reason = 0.15, "--quick: large enough for a smoke run to re-allocate slots"
    else:
        a.scaled_gamma = scaled_gamma(a.calls)
        a.gamma_reason = f"1 − (1 − 1e-3)^(150/{a.calls})"
    return a


def main(argv=None) -> dict:
    args = parse(argv)
    set_threads(args.threads)
    env = environment()
    t_all = time.perf_counter()
    data = {"train": tensors(fashion_mnist("train", limit=args.train_samples)),
            "test": tensors(fashion_mnist("test", limit=args.test_samples))}
    n_train = len(data["train"][1])
    est = estimate(args, n_train)
    print(f"sconv_fidelity: {len(args.arms)} arms × {len(args.seeds)} seeds on {n_train} / {len(data['test'][1])} "
          f"images, {args.epochs} epochs; scaled γ = {args.scaled_gamma:.4g} over {args.calls} calls; estimated "
          f"{est / 60:.1f} min", flush=True)
    if args.budget_min and est > 60 * args.budget_min:
        print(f"WARNING: the estimate ({est / 60:.0f} min) exceeds --budget-min {args.budget_min:g}: the machine is "
              f"slower or busier than the quiet 2-core machine this run is sized for (split it with --seeds)",
              flush=True)
    runs, targets = [], {}
    for seed in args.seeds:
        for arm in args.arms:
            runs.append(run_arm(arm, seed, args, data, targets))
    per_epoch = n_train // args.batch_size
    config = {**{k: v for k, v in vars(args).items() if k != "out"}, "train_samples": n_train,
              "test_samples": len(data["test"][1])}
    if args.append:
        earlier = previous_runs("sconv_fidelity", config, SETTINGS, args.seeds, args.out, args.quick)
        runs = sorted(earlier + runs, key=lambda r: (r["seed"], ARMS.index(r["arm"])))
        config["seeds"] = sorted({r["seed"] for r in runs})
    res = {"config": config,
           "environment": env, "paper": PAPER, "runs": runs, "summary": summarise(runs), "claims": claims(runs),
           "calls": args.calls, "iterations_per_call": max(1, per_epoch // args.periods_per_epoch),
           "estimate_seconds": est, "decision_rule": decide.__doc__.strip()}
    stem = result_stem("sconv_fidelity", args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"{stem}.png"
    res["plot"] = png.name
    plot(res, png)
    res["wall_seconds"] = time.perf_counter() - t_all
    js, md = write_results("sconv_fidelity", res, markdown(res), args.out, quick=args.quick)
    for c in res["claims"]:
        d = c["difference_points"]
        print(f"  {c['status']:>15}: {c['claim']} ({'—' if d is None else f'{d:+.2f}'} points, CI "
              f"{fmt_ci(c['ci95_points'])})")
    print(f"wrote {js}, {md}, {png} ({res['wall_seconds'] / 60:.1f} min)", flush=True)
    return res


if __name__ == "__main__":
    main()
