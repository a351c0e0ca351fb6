"""Discrimination-aware channel pruning for real: Fashion-MNIST, DCP against L1, BN-γ and group ECDM.

Per seed (default 0 1 2), on Debian's Fashion-MNIST (full 60k training / 10k test images):

1. **pre-training** — a CIFAR-style pre-activation ResNet (``preact_resnet_cifar(--depth)``,
   16/32/64 channels, 1 input channel), ``--epochs`` epoch(s) of SGD (Nesterov 0.9, cosine from
   ``--lr``, weight decay 5e-4, batch 128);
2. **DCP phase 1**, shared by every arm: auxiliary classifiers (``dcp_heads``, ``heads="auto"``:
   one per ten layers) and ``--phase1-steps`` steps of :func:`dcp.finetune` (the summed loss
   L_f + Σ L_S^p). Every arm starts from these weights (the heads removed for the baselines), so
   the arms differ only in how they choose channels (and DCP, by design, also re-fits the kept
   columns of the layers it prunes);
3. **pruning at η ∈ ``--ratios``** (default 0.3 and 0.5) of the block-internal channels (the first
   conv's outputs of every basic block, the only channels DCP prunes here), the same count per
   layer for every criterion (c − ⌊c·η⌋ kept): ``dcp`` (λ = 1; selection on ``--select-samples``
   training images, ``--select-steps`` masked-SGD steps per selected channel) and ``prune`` with
   ``criterion="l1"`` / ``"bn_gamma"`` / ``"ecdm"`` restricted to the same layers
   (``scope="uniform"``); then ``fold_masks`` → ``materialize``;
4. test accuracy **right after pruning**, and after **the same short fine-tune** for every arm
   (``--finetune-steps`` steps of plain cross-entropy SGD, cosine from ``--finetune-lr``);
5. the **λ ablation** at the last ratio: L_M only (``lam=0``), L_S only (``mse_weight=0``), both.

Then, once: **selection time against model size** — the ``dcp`` pass (η = 0.5, the same selection
data and steps) on pre-activation ResNets of ``--time-depths`` (random weights: the time does not
depend on them), against their parameter count.

Reported: accuracies per arm and seed, mean ± sd over seeds, the paired difference DCP − baseline
with its 95 % t-interval over seeds and the verdict it gives on the paper's claim (DCP beats
magnitude criteria at equal size): "holds" when the interval lies above 0, "does not hold" when it
lies below, "undecided" otherwise; a plot (``dcp_fashion_mnist{,_quick}.png``) of the accuracies
and of the selection time.

Sizes, for 2 CPU cores within an hour (measured on the 2-core EPYC under load: one training step
of ResNet-20 on 128 images costs 0.7 s of CPU, one DCP selection step on 256 images 0.2–1.3 s
depending on how far the layer's segment reaches): ResNet-20 at its standard width (16) is the
smallest pre-activation ResNet with three blocks per stage — enough blocks for two auxiliary
classifiers (``heads="auto"``) and nine pruned layers — and one epoch of Fashion-MNIST (469
steps) already makes it a usable classifier (the accuracy is recorded per seed); pre-training is shared by all arms of a seed and phase 1 by all arms; selection on
256 images with one SGD step per selected channel keeps one DCP run near half a minute (the paper
selects on the whole CIFAR training set; the cost grows linearly with the data); 100 fine-tuning
steps (12 800 images) separate recoverable from lost accuracy without erasing the differences
between criteria. Ten arms per seed, each evaluated twice on the 10 000 test images, make up
about a third of the time.

Run: ``python -m benchmarks.dcp_fashion_mnist --threads 2`` (full: about 45 min on two quiet
cores, estimated from CPU times; longer on a loaded machine) or ``--quick``
(ResNet-8, 2 000 training images, η = 0.5 and 0.75, selection on 32 images, one seed: a smoke
test of every step, ~1–2 min on a quiet machine). Writes
``benchmarks/results/dcp_fashion_mnist{,_quick}.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):                       # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import graphsel
from benchmarks.train import loader_accuracy
from benchmarks.common import (RESULTS, environment, environment_line, paired_difference, result_stem, set_threads, table,
                               write_results)
from graphsel.passes import dcp
from graphsel.tools.datasets import fashion_mnist
from graphsel.tools.models import preact_resnet_cifar

CRITERIA = ("dcp", "l1", "bn_gamma", "ecdm")
ABLATION = {"L_M only": {"lam": 0.0}, "L_S only": {"mse_weight": 0.0}, "both (DCP)": {}}
EXAMPLE = torch.zeros(1, 1, 28, 28)


# -- training and evaluation --------------------------------------------------------------------

def sgd_train(model: torch.nn.Module, loader: DataLoader, steps: int, lr: float, weight_decay: float) -> float:
    """``steps`` steps of cross-entropy SGD (Nesterov 0.9, cosine from ``lr``); returns seconds."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
                          lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    model.train()
    t0, step = time.perf_counter(), 0
    while step < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
    model.eval()
    return time.perf_counter() - t0


def size(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """Parameters and MACs at batch 1 (the shapes the pipeline recorded at ``EXAMPLE``)."""
    c = graphsel.cost(gm)
    return c.params, c.macs


# -- one seed ---------------------------------------------------------------------------------

def run_seed(seed: int, args, train_set, test_loader) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=128, shuffle=True, generator=gen, drop_last=True)
    out: dict = {"seed": seed, "arms": []}
    # 1. pre-training
    model = preact_resnet_cifar(args.depth, in_channels=1, num_classes=10)
    out["pretrain_seconds"] = sgd_train(model, loader, args.epochs * len(loader), args.lr, 5e-4)
    out["pretrained_accuracy"] = loader_accuracy(model, test_loader)
    # 2. phase 1 (shared)
    gm = graphsel.transform(model, [("dcp_heads", {"heads": "auto"})], EXAMPLE, progress=False)
    phase1 = dcp.finetune(gm, loader, steps=args.phase1_steps, mode="sum", lr=args.phase1_lr, progress=False)
    out["phase1"] = {"steps": phase1.steps, "seconds": phase1.seconds, "losses": phase1.losses,
                     "heads": len(dcp.heads_of(gm))}
    base = graphsel.transform(gm, ["dcp_remove_heads"], progress=False)
    out["phase1_accuracy"] = loader_accuracy(base, test_loader)
    out["dense_params"], out["dense_macs"] = size(base)
    pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(1000 + seed))[:args.select_samples]
    select = list(DataLoader(Subset(train_set, pick.tolist()), batch_size=128))
    a = graphsel.analyze_channels(base)
    layers, _ = dcp.candidate_layers(base, a, dcp.find_structure(base, a), "block_internal")
    producers = sorted({p for layer in layers for p in layer.producers})
    print(f"[seed {seed}] pre-trained {100 * out['pretrained_accuracy']:.2f} %, after phase 1 "
          f"{100 * out['phase1_accuracy']:.2f} % ({len(layers)} layers to prune, {out['phase1']['heads']} heads)",
          flush=True)

    def arm(kind: str, ratio: float, variant: str | None = None, extra: dict | None = None) -> dict:
        t0 = time.perf_counter()
        if kind == "dcp":
            options = {"ratio": ratio, "data": select, "steps": args.select_steps, "lr": args.select_lr,
                       "progress": False, **(extra or {})}
            slim = graphsel.transform(gm, [("dcp", options), "fold_masks", "materialize"], progress=False)
        else:
            options = {"ratio": ratio, "criterion": kind, "scope": "uniform", "include": producers}
            slim = graphsel.transform(base, [("prune", options), "fold_masks", "materialize"], progress=False)
        prune_seconds = time.perf_counter() - t0
        params, macs = size(slim)
        pruned = loader_accuracy(slim, test_loader)
        ft_gen = torch.Generator().manual_seed(2000 + seed)
        ft_loader = DataLoader(train_set, batch_size=128, shuffle=True, generator=ft_gen, drop_last=True)
        sgd_train(slim, ft_loader, args.finetune_steps, args.finetune_lr, 5e-4)
        tuned = loader_accuracy(slim, test_loader)
        r = {"kind": kind, "variant": variant or kind, "ratio": ratio, "pruned_accuracy": pruned,
             "finetuned_accuracy": tuned, "params": params, "macs": macs, "prune_seconds": prune_seconds}
        print(f"[seed {seed}] η={ratio} {variant or kind}: {100 * pruned:.2f} % after pruning, {100 * tuned:.2f} % "
              f"after fine-tuning; {params} params, {macs / 1e6:.2f} MMACs ({prune_seconds:.1f} s)", flush=True)
        return r

    for ratio in args.ratios:
        for kind in CRITERIA:
            out["arms"].append(arm(kind, ratio))
    last = args.ratios[-1]
    for name, extra in ABLATION.items():
        if extra:
            out["arms"].append(arm("dcp", last, name, extra))
    return out


def selection_time(args) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    n = args.select_samples
    data = [(torch.randn(min(128, n - i), 1, 28, 28, generator=g), torch.randint(0, 10, (min(128, n - i),), generator=g))
            for i in range(0, n, 128)]
    for depth in args.time_depths:
        torch.manual_seed(0)
        model = preact_resnet_cifar(depth, in_channels=1).eval()
        options = {"ratio": 0.5, "data": data, "steps": args.select_steps, "lr": args.select_lr, "progress": False}
        t0 = time.perf_counter()
        gm = graphsel.transform(model, [("dcp", options)], EXAMPLE, verify=False, progress=False)
        total = time.perf_counter() - t0
        st = dcp.dcp_state(gm)["layers"]
        rows.append({"depth": depth, "params": sum(p.numel() for p in model.parameters()), "layers": len(st),
                     "selected": sum(len(r["kept"]) for r in st.values()), "seconds": total,
                     "selection_seconds": sum(r["seconds"] for r in st.values())})
        print(f"[time] pre-act ResNet-{depth}: {rows[-1]['selected']} channels selected in {len(st)} layers, "
              f"{total:.1f} s", flush=True)
    return rows


# -- statistics and report --------------------------------------------------------------------------

def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(ci) -> str:
    if ci is None:
        return "undecided (one seed)"
    return "holds" if ci[0] > 0 else ("does not hold" if ci[1] < 0 else "undecided")


def by_seed(results: dict, variant: str, ratio: float, key: str) -> dict[int, float]:
    return {s["seed"]: r[key] for s in results["seeds"] for r in s["arms"]
            if r["variant"] == variant and r["ratio"] == ratio}


def summarise(results: dict) -> dict:
    summary = {"arms": [], "claims": []}
    variants = list(dict.fromkeys(r["variant"] for s in results["seeds"] for r in s["arms"]))
    ratios = list(dict.fromkeys(r["ratio"] for s in results["seeds"] for r in s["arms"]))
    for ratio in ratios:
        for v in variants:
            pr, ft = by_seed(results, v, ratio, "pruned_accuracy"), by_seed(results, v, ratio, "finetuned_accuracy")
            if not pr:
                continue
            arm0 = next(r for s in results["seeds"] for r in s["arms"] if r["variant"] == v and r["ratio"] == ratio)
            summary["arms"].append({"variant": v, "ratio": ratio, "pruned": mean_sd(list(pr.values())),
                                    "finetuned": mean_sd(list(ft.values())), "per_seed_pruned": pr,
                                    "per_seed_finetuned": ft, "params": arm0["params"], "macs": arm0["macs"]})
        for base in CRITERIA[1:]:
            for key, when in (("pruned_accuracy", "after pruning"), ("finetuned_accuracy", "after fine-tuning")):
                d = paired_difference(by_seed(results, "dcp", ratio, key), by_seed(results, base, ratio, key))
                summary["claims"].append({"ratio": ratio, "baseline": base, "when": when, **d,
                                          "verdict": verdict(d["ci"])})
    return summary


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = results["summary"]
    ratios = list(dict.fromkeys(a["ratio"] for a in s["arms"]))
    fig, axes = plt.subplots(1, len(ratios) + 1, figsize=(4.2 * (len(ratios) + 1), 3.6))
    colours = {"dcp": "#1b9e77", "l1": "#7570b3", "bn_gamma": "#d95f02", "ecdm": "#e7298a"}
    for ax, ratio in zip(axes, ratios):
        arms = [a for a in s["arms"] if a["ratio"] == ratio]
        xs = range(len(arms))
        for i, a in enumerate(arms):
            c = colours.get(a["variant"], "#999999")
            ax.bar(i - 0.2, 100 * a["pruned"][0], 0.4, yerr=100 * a["pruned"][1], color=c, alpha=0.45)
            ax.bar(i + 0.2, 100 * a["finetuned"][0], 0.4, yerr=100 * a["finetuned"][1], color=c)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([a["variant"] for a in arms], rotation=30, fontsize=7, ha="right")
        lo = min(100 * min(a["pruned"][0], a["finetuned"][0]) for a in arms)
        ax.set_ylim(max(0, lo - 5), 100)
        ax.set_title(f"η = {ratio}: test acc % (light: pruned, dark: fine-tuned)", fontsize=8)
    t = results["selection_time"]
    ax = axes[-1]
    if t:
        ax.plot([r["params"] / 1e6 for r in t], [r["seconds"] for r in t], "o-", color="#1b9e77")
        for r in t:
            ax.annotate(f"R-{r['depth']}", (r["params"] / 1e6, r["seconds"]), fontsize=7)
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("dcp pass seconds (η = 0.5)")
        ax.set_title("selection time against model size", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict) -> str:
    a, s = results["config"], results["summary"]
    seeds = [x["seed"] for x in results["seeds"]]
    lines = [f"# DCP on Fashion-MNIST (pre-activation ResNet-{a['depth']}{', quick smoke run' if a['quick'] else ''})",
             "", environment_line(results["environment"]), "",
             f"{a['train_samples']} training / {a['test_samples']} test images; seeds {', '.join(map(str, seeds))}. "
             f"Pre-training {a['epochs']} epoch(s) (SGD, cosine from {a['lr']}); phase 1: "
             f"{a['phase1_steps']} steps of the summed auxiliary loss, shared by every arm; DCP selects on "
             f"{a['select_samples']} training images with {a['select_steps']} masked-SGD step(s) per channel; "
             f"the baselines prune the same layers to the same counts; every arm is fine-tuned "
             f"{a['finetune_steps']} steps (cosine from {a['finetune_lr']}).", ""]
    rows = [[x["seed"], f"{100 * x['pretrained_accuracy']:.2f}", f"{100 * x['phase1_accuracy']:.2f}",
             x["phase1"]["heads"], f"{x['pretrain_seconds']:.0f}", f"{x['phase1']['seconds']:.0f}"]
            for x in results["seeds"]]
    lines += [table(rows, ["seed", "pre-trained acc %", "after phase 1 %", "heads", "pre-train s", "phase 1 s"]), ""]
    rows = []
    for arm in s["arms"]:
        pr, ft = arm["pruned"], arm["finetuned"]
        per = " / ".join(f"{100 * v:.2f}" for v in arm["per_seed_finetuned"].values())
        rows.append([arm["ratio"], arm["variant"], f"{100 * pr[0]:.2f} ± {100 * pr[1]:.2f}",
                     f"{100 * ft[0]:.2f} ± {100 * ft[1]:.2f}", per, f"{arm['params'] / 1e3:.1f}k",
                     f"{arm['macs'] / 1e6:.2f}"])
    lines += ["Test accuracy (mean ± sd over seeds):", "",
              table(rows, ["η", "arm", "after pruning %", "after fine-tune %", "fine-tuned per seed",
                           "params", "MMACs"]), ""]
    rows = [[c["ratio"], c["baseline"], c["when"], f"{100 * c['mean']:+.2f}" if c["mean"] is not None else "—",
             f"[{100 * c['ci'][0]:+.2f}, {100 * c['ci'][1]:+.2f}]" if c["ci"] else "—", c["verdict"]]
            for c in s["claims"]]
    lines += ["The paper's claim, DCP beats the magnitude criteria at equal size (paired over seeds, 95 % "
              "t-interval of DCP − baseline, in accuracy points):", "",
              table(rows, ["η", "baseline", "when", "DCP − baseline", "95 % CI", "claim"]), ""]
    t = results["selection_time"]
    if t:
        rows = [[f"ResNet-{r['depth']}", f"{r['params'] / 1e3:.0f}k", r["layers"], r["selected"],
                 f"{r['seconds']:.1f}", f"{r['seconds'] / max(1, r['selected']):.3f}"] for r in t]
        lines += [f"Selection time (the `dcp` pass at η = 0.5, {a['select_samples']} images, "
                  f"{a['select_steps']} SGD step(s) per channel):", "",
                  table(rows, ["model", "params", "layers", "channels selected", "seconds", "s / channel"]), ""]
    lines += [f"![DCP on Fashion-MNIST]({results['plot']})", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: ResNet-8, 2 000 images, one seed")
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--train-samples", type=int, default=60000)
    ap.add_argument("--test-samples", type=int, default=10000)
    ap.add_argument("--phase1-steps", type=int, default=100)
    ap.add_argument("--phase1-lr", type=float, default=0.01)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--select-samples", type=int, default=256)
    ap.add_argument("--select-steps", type=int, default=1)
    ap.add_argument("--select-lr", type=float, default=0.01)
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--finetune-lr", type=float, default=0.02)
    ap.add_argument("--time-depths", type=int, nargs="*", default=[8, 14, 20, 32])
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.depth, args.epochs, args.train_samples, args.test_samples = 8, 1, 2000, 1000
        args.phase1_steps, args.select_samples, args.select_steps, args.finetune_steps = 5, 32, 1, 10
        args.ratios, args.time_depths = [0.5, 0.75], [8]
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    set_threads(args.threads)
    t0 = time.perf_counter()
    train_set = fashion_mnist("train", limit=args.train_samples)
    test_loader = DataLoader(fashion_mnist("test", limit=args.test_samples), batch_size=1000)
    results = {"config": {**{k: v for k, v in vars(args).items() if k != "out"}, "quick": args.quick},
               "environment": environment(), "seeds": []}
    for seed in args.seeds:
        results["seeds"].append(run_seed(seed, args, train_set, test_loader))
    results["selection_time"] = selection_time(args)
    results["summary"] = summarise(results)
    results["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"{result_stem('dcp_fashion_mnist', args.quick)}.png"
    results["plot"] = png.name
    plot(results, png)
    js, md = write_results("dcp_fashion_mnist", results, markdown(results), args.out, quick=args.quick)
    print(f"wrote {js}, {md} and {png} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
