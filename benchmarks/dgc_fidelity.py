"""Dynamic group convolution against its paper's claims: Fashion-MNIST at CPU scale, matched-cost
baselines, a random-gating ablation, three pruning rates, several seeds.

**The claims** (paper 002 and its supplement): a DGC network keeps its accuracy at a fraction of the
MACs — ResNet-18 on ImageNet at ξ = 0.55: 31.22 % top-1 error at 890 M of 1 823 M MACs (the dense
ResNet-18: 30.24 %, torchvision's figure) — because each head *selects* its input channels per
sample by a learned saliency, which a static structure of the same cost (a thinner network, a
pruned one, a group convolution: CondenseNet-86 5.00 % against CondenseNet-86-DGC 4.77 % on
CIFAR-10) cannot.

**Arms** (for every seed: the same initialisation of the shared architecture — ``torch.manual_seed``
before it is built — the same data order and augmentation draws):

* ``dense`` — ``resnet_cifar(8)`` (post-activation basic blocks, parameter-free shortcuts);
* ``dgc_xi0.3``, ``dgc_xi0.5``, ``dgc_xi0.75`` — the ``dynamic_group_conv`` pass with the papers'
  options: 4 heads, ``placement="paper"`` (every block conv; each DGC layer normalises and
  rectifies its input — the BN → ReLU before ``conv2`` is absorbed, ``conv1`` gets a fresh one; the
  1-channel stem stays dense), ``init="authors"`` (fc2 Kaiming-normal, bias 1), head-wise gating
  with the authors' k schedule (warm-up to 1/12, ramp, full ξ from 3/4), loss = cross-entropy +
  saliency lasso (λ_s = 1e-5). ``--gating global`` switches to the global threshold (signed
  saliencies, angle enlargement λ_a = 1e-4, T re-fitted 25 times from a 10-iteration saliency
  library, evaluated with the T of the last training calibration unless ``--final-threshold
  recalibrate``, which the results then say);
* baselines at the MACs of ``dgc_xi0.5`` (one set, at ξ = 0.5; the other ξ have no integer group
  count):
  - ``width_matched`` — the same ResNet with every stage's width scaled by one factor, chosen so its
    MACs are closest to ``dgc_xi0.5``'s, trained from scratch;
  - ``prune_finetune`` — the trained ``dense`` model of the same seed, pruned by graphsel (``prune``:
    L1, uniform per group, ``target_macs`` = ``dgc_xi0.5``'s MACs → ``fold_masks`` → ``materialize``)
    and fine-tuned ``--finetune-epochs`` (1) at a cosine learning rate from 0.01 (so it trains one
    epoch longer than the others);
  - ``static_group`` — the dense ResNet with each block conv a static group convolution of
    1 / (1 − ξ) = 2 groups, each followed by a channel shuffle (as ShuffleNet; without it the two
    halves would never meet);
* ``random_gating`` — ``dgc_xi0.5`` with each head keeping a uniformly random set of C_in − k
  channels per sample, gates 1 (:func:`graphsel.passes.dynamic_group_conv.use_random_gating`): the
  same MACs without the saliency generators (whose MACs it saves).

``macs`` are ``graphsel.cost``'s (conv + linear, 1×1×28×28; DGC layers at their kept fraction plus
the saliency generators), ``params`` all parameters.

**Recipe**: SGD with Nesterov momentum 0.9, cosine learning rate from 0.1 to 0 per iteration,
weight decay 1e-4 on every parameter (BatchNorm and biases included, as the authors' code),
batch 128, random translation up to 4 px and horizontal flip (the CIFAR augmentation; the paper
trains CIFAR with it), images normalised with the training set's mean and sd.

**Sizes and constants** (full mode; each chosen to fit 2 CPU cores and ≤ 60 minutes): the full
60 000 / 10 000 images; 3 seeds × 8 arms = 24 trainings (+ 3 fine-tunings); ``resnet_cifar(8)``
(one block per stage, 75 k parameters, 9.1 M MACs dense — ResNet-18 on ImageNet has 11.7 M and
1.8 G); 2 epochs (936 iterations; the k schedule is defined on the fraction of training, so it
ramps from iteration 78 to 702 and holds ξ for the last 234); a DGC training iteration costs
about 3× a dense one on CPU (the masked formulation computes every head over all channels), so
the 12 DGC-type trainings dominate; the whole run is sized at about 40–50 minutes on a quiet
2-core machine (the script prints its own estimate first). Measured on the EPYC (2026-12-07), one
seed per single-threaded process beside other benchmarks: 53 and 61 min per seed; a quiet
two-thread run has not been timed.

**Statistics and the decision rule**: per arm, mean ± sd of the test accuracy over seeds; per
claim, the paired difference (method − reference, same seed) in accuracy points, its mean and
95 % confidence interval (Student's t, n − 1 degrees of freedom). A claim "the difference exceeds
the threshold" (0 for "better than", −1 for "within one point of") is ``reproduced`` when the
interval lies above the threshold, ``not reproduced`` when it lies below, ``undecided`` when it
contains it (:func:`benchmarks.common.decide`).

Run: ``python -m benchmarks.dgc_fidelity`` (full) or ``--quick`` (smoke test of every arm and the
statistics: 256 images, 2 epochs, 3 seeds). A run can be split by seeds: ``--seeds 0``, then
``--seeds 1 --append``, ... (``--append`` keeps the other seeds' runs of the results file). Writes
``benchmarks/results/dgc_fidelity{,_quick}.{json,md}`` and ``..._macs.png`` (accuracy against MACs).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

if __package__ in (None, ""):                       # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn as nn

import graphsel
from benchmarks.common import (RESULTS, decide, environment, environment_line, human, mean_sd, paired_difference,
                               previous_runs, result_stem, set_threads, table, write_results)
from benchmarks.train import count_params, evaluate, tensors, train
from graphsel.passes import dynamic_group_conv as dgc
from graphsel.tools.datasets import fashion_mnist
from graphsel.tools.models import BasicBlock, resnet_cifar

XIS = (0.3, 0.5, 0.75)
MATCH_XI = 0.5
ARMS = ("dense", "dgc_xi0.3", "dgc_xi0.5", "dgc_xi0.75", "width_matched", "prune_finetune", "static_group",
        "random_gating")
DGC_ARMS = {**{f"dgc_xi{xi}": xi for xi in XIS}, "random_gating": MATCH_XI}
# the settings an --append run must share with the results file it extends
SETTINGS = ("depth", "heads", "init", "gating", "final_threshold", "epochs", "finetune_epochs",
            "finetune_lr", "batch_size", "lr", "weight_decay", "lasso", "groups", "train_samples",
            "test_samples", "no_augment")
PAPER = {"resnet18_imagenet": {"xi": 0.55, "top1_error": 31.22, "macs": 890e6, "dense_macs": 1823e6,
                               "dense_top1_error": 30.24},
         "condensenet86_cifar10": {"lgc_error": 5.00, "dgc_error": 4.77, "dgc_global_error": 4.42}}

# (claim, method arm, reference arm, threshold in accuracy points)
CLAIMS = [
    ("DGC at ξ = 0.5 stays within 1 point of the dense network's accuracy at about half its MACs (paper: "
     "ResNet-18 on ImageNet at ξ = 0.55, 890 M of 1 823 M MACs, 31.22 % against 30.24 % top-1 error)",
     "dgc_xi0.5", "dense", -1.0),
    ("DGC at ξ = 0.5 beats a thinner dense network of the same MACs", "dgc_xi0.5", "width_matched", 0.0),
    ("DGC at ξ = 0.5 beats pruning the trained dense network to the same MACs and fine-tuning it",
     "dgc_xi0.5", "prune_finetune", 0.0),
    ("DGC at ξ = 0.5 beats a static group convolution of the same MACs (paper: CondenseNet-86 5.00 % against "
     "CondenseNet-86-DGC 4.77 % error on CIFAR-10)", "dgc_xi0.5", "static_group", 0.0),
    ("Learned saliencies beat random channel selection at the same ξ (0.5)", "dgc_xi0.5", "random_gating", 0.0),
]


# -- architectures ------------------------------------------------------------------------------

class WidthResNet(nn.Module):
    """``resnet_cifar`` with stage widths ``widths`` (``(16, 32, 64)`` is ``resnet_cifar(6n + 2)``)."""

    def __init__(self, n: int, widths: tuple[int, int, int], in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        c = widths[0]
        self.stem = nn.Sequential(OrderedDict([("conv", nn.Conv2d(in_channels, c, 3, padding=1, bias=False)),
                                               ("bn", nn.BatchNorm2d(c)), ("relu", nn.ReLU(inplace=True))]))
        stages = []
        for s, planes in enumerate(widths):
            stride = 1 if s == 0 else 2
            blocks = [BasicBlock(c, planes, stride, "A")] + [BasicBlock(planes, planes, 1, "A") for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            c = planes
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():                     # resnet_cifar's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(self.stem(x))), 1))


class ShuffledGroupConv(nn.Module):
    """A static group convolution (``groups``) followed by a channel shuffle (ShuffleNet's)."""

    def __init__(self, conv: nn.Conv2d, groups: int):
        super().__init__()
        self.groups = groups
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, groups=groups, bias=conv.bias is not None)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        y = self.conv(x)
        n, c, h, w = y.shape
        return y.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def block_convs(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("features.")]


def static_group(model: nn.Module, groups: int) -> nn.Module:
    for path in block_convs(model):
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, ShuffledGroupConv(model.get_submodule(path), groups))
    return model


def macs_of(model: nn.Module) -> int:
    """MACs of one 1×28×28 image (DGC layers at their current kept fraction, see ``dgc_macs``)."""
    return graphsel.cost(model.eval(), torch.randn(1, 1, 28, 28)).macs


def match_width(depth: int, target: float) -> tuple[tuple[int, int, int], float, int]:
    """The stage widths ``round(w·(16, 32, 64))`` whose MACs are closest to ``target`` (bisection on w)."""
    n = (depth - 2) // 6
    widths = lambda w: tuple(max(1, round(w * b)) for b in (16, 32, 64))
    cache: dict = {}

    def macs(w):
        k = widths(w)
        if k not in cache:
            cache[k] = macs_of(WidthResNet(n, k))
        return cache[k]

    lo, hi = 0.05, 1.0
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(mid) < target else (lo, mid)
    w = min((lo, hi), key=lambda v: abs(macs(v) - target))
    return widths(w), w, macs(w)


def dgc_options(xi: float, args) -> dict:
    return {"ratio": xi, "heads": args.heads, "placement": "paper", "init": args.init}


def build(arm: str, seed: int, args, shared: dict) -> nn.Module:
    torch.manual_seed(seed)
    if arm == "width_matched":
        return WidthResNet((args.depth - 2) // 6, shared["widths"])
    model = resnet_cifar(args.depth, in_channels=1, num_classes=10)
    if arm == "static_group":
        return static_group(model, args.groups)
    if arm in DGC_ARMS:
        gm = graphsel.transform(model, [("dynamic_group_conv", dgc_options(DGC_ARMS[arm], args))],
                                torch.randn(2, 1, 28, 28), progress=False)
        if arm == "random_gating":
            dgc.use_random_gating(gm, seed=seed)
        return gm
    return model


# -- one arm ------------------------------------------------------------------------------------

def make_optimizer(model: nn.Module, lr: float, args) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)


def test_with_rates(model: nn.Module, test_set, is_dgc: bool) -> tuple[float, float | None]:
    """Test accuracy and, for DGC models, the measured pruning rate (all saliency entries, the paper's eq. 2)."""
    totals = {"pruned": 0.0, "entries": 0.0}

    def per_batch(m):
        for _, layer in dgc.dgc_modules(m):
            kept = layer.last_kept.double()
            totals["pruned"] += float((layer.in_channels - kept).sum())
            totals["entries"] += kept.numel() * layer.in_channels

    acc = evaluate(model, test_set, per_batch=per_batch if is_dgc else None)
    return acc, (totals["pruned"] / totals["entries"] if is_dgc and totals["entries"] else None)


def run_arm(arm: str, seed: int, args, data: dict, shared: dict) -> dict:
    record: dict = {"arm": arm, "seed": seed}
    is_dgc = arm in DGC_ARMS
    trainer = None
    if arm == "prune_finetune":
        dense = shared["trained_dense"][seed]
        t0 = time.perf_counter()
        model = graphsel.transform(dense, [("prune", {"target_macs": float(shared["target_macs"]), "scope": "uniform",
                                                      "criterion": "l1"}), "fold_masks", "materialize"],
                                   torch.randn(1, 1, 28, 28), progress=False, verify=False)   # MACs per image
        record["pruned_widths"] = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
        record["pre_finetune_acc"] = evaluate(model, data["test"])
        opt = make_optimizer(model, args.finetune_lr, args)
        record["prune_seconds"] = time.perf_counter() - t0
        run = train(model, opt, data["train"], epochs=args.finetune_epochs, batch_size=args.batch_size, seed=seed,
                    augmentation=not args.no_augment, label=f"{arm} seed {seed}", verbose=args.verbose)
    else:
        model = build(arm, seed, args, shared)
        opt = make_optimizer(model, args.lr, args)
        steps = args.epochs * (len(data["train"][1]) // args.batch_size)
        hooks = {}
        if is_dgc:
            gating = "head" if arm == "random_gating" else args.gating
            trainer = dgc.DGCTraining(model, steps, gating=gating, threshold_updates=args.threshold_updates,
                                      window=args.window, lasso=args.lasso)
            hooks = {"before_step": trainer.before_step, "after_step": trainer.after_step,
                     "extra_loss": trainer.regularizer}
        run = train(model, opt, data["train"], epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                    augmentation=not args.no_augment, label=f"{arm} seed {seed}", verbose=args.verbose, **hooks)
    if trainer is not None:
        calib = None
        if args.final_threshold == "recalibrate":
            images = data["train"][0]
            calib = [images[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.calibration_batches)]
        report = trainer.finish(args.final_threshold, data=calib)
        record["threshold"] = report.as_dict()
        record["gating"] = report.gating
    if arm == "dense":
        shared.setdefault("trained_dense", {})[seed] = model
    record.update(train_seconds=run["train_seconds"], log=run["log"])
    acc, rate = test_with_rates(model, data["test"], is_dgc)
    record.update(test_acc=acc, params=count_params(model), macs=macs_of(model))
    if rate is not None:
        record["test_pruning_rate"] = rate
        record["xi"] = DGC_ARMS[arm]
    print(f"{arm:>14} seed {seed}: test acc {100 * acc:.2f} %, MACs {human(record['macs'])}, params "
          f"{record['params']}" + (f", test pruning rate {rate:.3f}" if rate is not None else "")
          + f" ({record['train_seconds']:.0f} s)", flush=True)
    return record


# -- statistics ---------------------------------------------------------------------------------

def by_arm(runs: list[dict], arm: str) -> dict[int, float]:
    return {r["seed"]: 100 * r["test_acc"] for r in runs if r["arm"] == arm}


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for arm in ARMS:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        m, s = mean_sd([100 * r["test_acc"] for r in rs])
        rates = [r["test_pruning_rate"] for r in rs if "test_pruning_rate" in r]
        rows.append({"arm": arm, "seeds": [r["seed"] for r in rs], "acc": [100 * r["test_acc"] for r in rs],
                     "acc_mean": m, "acc_sd": s, "macs_mean": statistics.mean(r["macs"] for r in rs),
                     "params_mean": statistics.mean(r["params"] for r in rs),
                     "test_pruning_rate": statistics.mean(rates) if rates else None,
                     "train_seconds": statistics.mean(r["train_seconds"] for r in rs)})
    return rows


def claims(runs: list[dict]) -> list[dict]:
    out = []
    for text, method, ref, threshold in CLAIMS:
        d = paired_difference(by_arm(runs, method), by_arm(runs, ref))
        out.append({"claim": text, "status": decide(d["ci"], threshold), "method": method, "reference": ref,
                    "threshold_points": threshold, "difference_points": d["mean"], "sd_points": d["sd"],
                    "ci95_points": d["ci"], "n_seeds": d["n"], "per_seed_points": d["diffs"]})
    return out


# -- report -------------------------------------------------------------------------------------

COLOURS = {"dense": "#000000", "width_matched": "#1b9e77", "prune_finetune": "#7570b3", "static_group": "#e7298a",
           "random_gating": "#66a61e"}


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    summary = {s["arm"]: s for s in res["summary"]}
    for r in res["runs"]:
        ax.scatter(r["macs"] / 1e6, 100 * r["test_acc"], s=10, color="#bbbbbb", zorder=1)
    dg = [summary[a] for a in ARMS if a.startswith("dgc_") and a in summary]
    if dg:
        ax.errorbar([s["macs_mean"] / 1e6 for s in dg], [s["acc_mean"] for s in dg], yerr=[s["acc_sd"] for s in dg],
                    fmt="o-", color="#d95f02", capsize=3, label="DGC (ξ = 0.75, 0.5, 0.3)", zorder=3)
        for s in dg:
            ax.annotate(s["arm"].replace("dgc_xi", "ξ="), (s["macs_mean"] / 1e6, s["acc_mean"]), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
    for arm, colour in COLOURS.items():
        if arm in summary:
            s = summary[arm]
            ax.errorbar([s["macs_mean"] / 1e6], [s["acc_mean"]], yerr=[s["acc_sd"]], fmt="s", color=colour, capsize=3,
                        label=arm, zorder=3)
    ax.set_xlabel("MMACs per image (graphsel.cost; DGC at its kept fraction + saliency generators)")
    ax.set_ylabel("test accuracy % (mean ± sd; grey: seeds)")
    ax.set_title("DGC on Fashion-MNIST: accuracy against MACs", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt_ci(ci) -> str:
    return "—" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def markdown(res: dict) -> str:
    a = res["config"]
    gating = ("head-wise" if a["gating"] == "head" else
              f"global threshold, evaluated with {'T re-fitted after training (recalibrate)' if a['final_threshold'] == 'recalibrate' else 'the T of the last training calibration'}")
    lines = [f"# Dynamic group convolution: fidelity to the paper's claims{' (quick smoke run)' if a['quick'] else ''}",
             "", environment_line(res["environment"]), "",
             f"resnet_cifar({a['depth']}) on Fashion-MNIST: {a['train_samples']} training / {a['test_samples']} test "
             f"images, {a['epochs']} epochs, batch {a['batch_size']}, SGD Nesterov 0.9, cosine lr from {a['lr']}, weight "
             f"decay {a['weight_decay']} on every parameter, {'no augmentation' if a['no_augment'] else 'translation ±4 px + flip'}. "
             f"DGC: {a['heads']} heads, placement='paper', init='{a['init']}', {gating}, lasso {a['lasso']}. "
             f"Baselines at the MACs of dgc_xi0.5 ({human(res['target_macs'])}): width_matched widths "
             f"{tuple(res['widths'])} ({human(res['width_macs'])} MACs), static_group {a['groups']} groups + shuffle, "
             f"prune_finetune {a['finetune_epochs']} fine-tuning epoch(s) from lr {a['finetune_lr']}. "
             f"Seeds {', '.join(map(str, a['seeds']))}.", "",
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
    dense = next((s for s in res["summary"] if s["arm"] == "dense"), None)
    lines.append(table([[s["arm"], " / ".join(f"{v:.2f}" for v in s["acc"]), f"{s['acc_mean']:.2f} ± {s['acc_sd']:.2f}",
                         human(s["macs_mean"]), f"{s['macs_mean'] / dense['macs_mean']:.3f}" if dense else "—",
                         human(s["params_mean"]),
                         "—" if s["test_pruning_rate"] is None else f"{s['test_pruning_rate']:.3f}",
                         f"{s['train_seconds']:.0f}"] for s in res["summary"]],
                       ["arm", "test acc % per seed", "mean ± sd", "MACs", "MACs / dense", "params",
                        "test pruning rate", "train s"]))
    th = [r for r in res["runs"] if r.get("threshold") and r["threshold"]["gating"] == "global"]
    if th:
        lines += ["", "Global threshold (evaluation policy, T, training calibrations): "
                  + "; ".join(f"{r['arm']} seed {r['seed']}: {r['threshold']['policy']}, T = {r['threshold']['threshold']:.4f}"
                              f", {r['threshold']['updates']} updates" for r in th)]
    pf = [r for r in res["runs"] if r["arm"] == "prune_finetune"]
    if pf:
        lines += ["", "prune_finetune: accuracy right after pruning (before fine-tuning) "
                  + " / ".join(f"{100 * r['pre_finetune_acc']:.2f}" for r in pf) + " %; widths "
                  + str({k: v for k, v in pf[0]["pruned_widths"].items() if "conv1" in k})]
    lines += ["", f"![accuracy against MACs]({res['plot']})", ""]
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------------

def estimate(args, n_train: int, shared: dict) -> float:
    """Seconds the run should take, from a few timed steps of the dense and a DGC model."""
    x, y = torch.randn(args.batch_size, 1, 28, 28), torch.randint(0, 10, (args.batch_size,))
    times = {}
    for arm in ("dense", "dgc_xi0.5"):
        m = build(arm, 0, args, shared).train()
        trainer = dgc.DGCTraining(m, 10, gating="head") if arm != "dense" else None
        opt = make_optimizer(m, 0.01, args)
        ts = []
        for i in range(4):
            t0 = time.perf_counter()
            if trainer:
                trainer.before_step(9)
            loss = nn.functional.cross_entropy(m(x), y) + (trainer.regularizer() if trainer else 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ts.append(time.perf_counter() - t0)
        times[arm] = min(ts[1:])
    steps = args.epochs * (n_train // args.batch_size)
    ft = args.finetune_epochs * (n_train // args.batch_size)
    per_seed = (steps * (4 * times["dgc_xi0.5"] + 2.3 * times["dense"]) + ft * 0.6 * times["dense"]) * 1.1 \
        + 8 * 0.004 * args.test_samples
    return per_seed * len(args.seeds)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 256 images, 2 epochs, batch 64")
    p.add_argument("--depth", type=int, default=8, help="resnet_cifar depth (6n + 2)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--init", default="authors", choices=dgc.SALIENCY_INITS,
                   help="saliency generator initialisation (the authors': fc2 Kaiming, bias 1)")
    p.add_argument("--gating", default="head", choices=("head", "global"))
    p.add_argument("--final-threshold", default="last_training", choices=dgc.EVAL_THRESHOLD_POLICIES,
                   help="global gating: evaluate with the last training calibration's T, or re-fit it after training")
    p.add_argument("--threshold-updates", type=int, default=25)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--lasso", type=float, default=1e-5)
    p.add_argument("--groups", type=int, default=round(1 / (1 - MATCH_XI)), help="static_group: groups per conv")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1e-4)
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
        a.train_samples, a.test_samples, a.batch_size = min(a.train_samples, 256), min(a.test_samples, 500), 64
        a.window, a.threshold_updates, a.calibration_batches = 2, 4, 2
    if a.seeds is None:
        a.seeds = [0, 1, 2]
    if "prune_finetune" in a.arms and "dense" not in a.arms:
        p.error("prune_finetune needs dense (it prunes that trained model)")
    a.arms = [arm for arm in ARMS if arm in a.arms]                 # dense first
    return a


def main(argv=None) -> dict:
    args = parse(argv)
    set_threads(args.threads)
    env = environment()
    t_all = time.perf_counter()
    data = {"train": tensors(fashion_mnist("train", limit=args.train_samples)),
            "test": tensors(fashion_mnist("test", limit=args.test_samples))}
    n_train = len(data["train"][1])
    shared: dict = {}
    probe = build("dgc_xi0.5", 0, args, shared)
    dgc.set_progress(probe, 1.0)
    shared["target_macs"] = macs_of(probe)
    shared["widths"], w, shared["width_macs"] = match_width(args.depth, shared["target_macs"])
    est = estimate(args, n_train, shared)
    print(f"dgc_fidelity: {len(args.arms)} arms × {len(args.seeds)} seeds on {n_train} / {len(data['test'][1])} images, "
          f"{args.epochs} epochs; target MACs {human(shared['target_macs'])} (dgc_xi0.5), width-matched widths "
          f"{shared['widths']} ({human(shared['width_macs'])}); estimated {est / 60:.1f} min", flush=True)
    if args.budget_min and est > 60 * args.budget_min:
        print(f"WARNING: the estimate ({est / 60:.0f} min) exceeds --budget-min {args.budget_min:g}: the machine is "
              f"slower or busier than the quiet 2-core machine this run is sized for (split it with --seeds)",
              flush=True)
    runs = []
    for seed in args.seeds:
        for arm in args.arms:
            runs.append(run_arm(arm, seed, args, data, shared))
        shared.get("trained_dense", {}).pop(seed, None)
    config = {**{k: v for k, v in vars(args).items() if k != "out"}, "train_samples": n_train,
              "test_samples": len(data["test"][1])}
    if args.append:
        earlier = previous_runs("dgc_fidelity", config, SETTINGS, args.seeds, args.out, args.quick)
        runs = sorted(earlier + runs, key=lambda r: (r["seed"], ARMS.index(r["arm"])))
        config["seeds"] = sorted({r["seed"] for r in runs})
    res = {"config": config,
           "environment": env, "paper": PAPER, "runs": runs, "summary": summarise(runs), "claims": claims(runs),
           "target_macs": shared["target_macs"], "widths": list(shared["widths"]), "width_factor": w,
           "width_macs": shared["width_macs"], "estimate_seconds": est, "decision_rule": decide.__doc__.strip()}
    stem = result_stem("dgc_fidelity", args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"{stem}_macs.png"
    res["plot"] = png.name
    plot(res, png)
    res["wall_seconds"] = time.perf_counter() - t_all
    js, md = write_results("dgc_fidelity", res, markdown(res), args.out, quick=args.quick)
    for c in res["claims"]:
        d = c["difference_points"]
        print(f"  {c['status']:>15}: {c['claim'][:90]} ({'—' if d is None else f'{d:+.2f}'} points, CI "
              f"{fmt_ci(c['ci95_points'])})")
    print(f"wrote {js}, {md}, {png} ({res['wall_seconds'] / 60:.1f} min)", flush=True)
    return res


if __name__ == "__main__":
    main()
