"""Dynamic group convolution: measured CPU latency of the fast inference path vs the dense model.

For torchvision's ResNet-18 (random initialisation, 224², eval, no grad) converted with the
``dynamic_group_conv`` pass (4 heads; every block conv; the 3-channel stem stays dense) at
ξ ∈ {0.5, 0.75}, at batch 1 and 8:

* per DGC layer: the dense layer it replaced (its absorbed BatchNorm → ReLU, then the original
  conv) vs the DGC layer's fast path, on the activations the layer sees in the network;
* the whole network, dense vs DGC;
* the speed-up against the counted MACs reduction (``graphsel.cost``), and the *realised
  fraction* of the saving: (1 − t_dgc / t_dense) / (1 − MACs_dgc / MACs_dense). The goal is a
  realised fraction ≥ 0.5 at batch 1.

The saliency generators get random weights (fc2 ~ N(0, 1/d), bias ~ 1 + N(0, 0.1²)) so that
samples select different channels, as trained DGC layers do; at insertion every saliency is 1
and all samples would keep the same channels, which flatters the batched path. The DGC model's
BatchNorm statistics are then re-estimated on a few random batches (``calibrate_batchnorm``):
with the random-init statistics the gated activations grew layer by layer (a saliency grows
with its layer's input scale) up to inf/NaN in layer4, unlike a trained network's. Timings do
not depend on the values; the dense model keeps its random-init statistics.

Timing: each measurement alternates the candidates and keeps the minimum and the median of
``--repeats`` rounds (the minimum is robust to other processes on the machine). Threads:
``--threads`` (default 1: the batch-1 CPU deployment case). ``--clock thread`` measures the
calling thread's CPU time instead of wall time (single-threaded runs only): on a machine shared
with other jobs it leaves out the time the process waits for a core.

Run: ``python -m benchmarks.dgc_latency`` (full: ~2 min on a quiet core) or ``--quick``
(small input, a smoke test). Writes ``benchmarks/results/dgc_latency{,_quick}.{json,md}``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

if __package__ in (None, ""):                       # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn as nn
import torchvision

import graphsel
from benchmarks.common import RESULTS, environment, environment_line, measure, set_threads, table, write_results
from graphsel.passes import dynamic_group_conv as dgc


def randomise_saliency(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in dgc.dgc_modules(model):
            d = m.saliency.hidden
            m.saliency.fc2_weight.copy_(torch.randn(m.saliency.fc2_weight.shape, generator=gen) / d ** 0.5)
            m.saliency.fc2_bias.copy_(1 + 0.1 * torch.randn(m.saliency.fc2_bias.shape, generator=gen))


def calibrate_batchnorm(model: nn.Module, size: int, batches: int = 4, batch: int = 8, seed: int = 1) -> None:
    """Re-estimate every BatchNorm's running statistics (cumulative average) on random inputs."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch, 3, size, size, generator=gen))
    for bn in norms:
        bn.momentum = 0.1
        bn.eval()


def dense_layer(model: nn.Module, path: str, m: dgc.DynamicGroupConv2d) -> nn.Module:
    """The dense computation the DGC layer replaced: [its BatchNorm → ReLU] → the original conv."""
    conv = model.get_submodule(path)
    parts = ([copy.deepcopy(m.norm)] if m.norm is not None else []) + ([nn.ReLU()] if m.pre_relu else []) + [conv]
    return nn.Sequential(*parts).eval()


def layer_inputs(gm: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, p=p: seen.__setitem__(p, inp[0]))
             for p, m in dgc.dgc_modules(gm)]
    with torch.inference_mode():
        gm(x)
    for h in hooks:
        h.remove()
    return seen


def run(args) -> dict:
    set_threads(args.threads)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    timer = lambda candidates, *a, **k: measure(candidates, *a, clock=clock, **k)  # noqa: E731
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    example = torch.randn(1, 3, args.size, args.size)
    results = {"config": {"model": "torchvision resnet18 (random init)", "size": args.size, "threads": args.threads,
                          "repeats": args.repeats, "layer_repeats": args.layer_repeats, "heads": 4,
                          "clock": args.clock,
                          "quick": args.quick},
               "environment": environment(), "runs": []}
    dense_cost = graphsel.cost(model, example)
    for ratio in args.ratios:
        gm = graphsel.transform(model, [("dynamic_group_conv", {"ratio": ratio, "heads": 4})], example,
                                verify=False).eval()
        dgc.set_progress(gm, 1.0)
        randomise_saliency(gm)
        calibrate_batchnorm(gm, args.size)
        dgc_cost = graphsel.cost(gm)
        mac_ratio = dgc_cost.macs / dense_cost.macs
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size)
            with torch.inference_mode():
                net = timer({"dense": lambda: model(x), "dgc": lambda: gm(x)}, args.repeats)
            inputs = layer_inputs(gm, x)
            rows = {r["layer"]: r for r in dgc.dgc_cost_rows(gm, (x,))}
            layers = []
            for path, m in dgc.dgc_modules(gm):
                dense = dense_layer(model, path, m)
                xi = inputs[path]
                with torch.inference_mode():
                    t = timer({"dense": lambda: dense(xi), "dgc": lambda: m(xi)}, args.layer_repeats, inner=2)
                r = rows[path]
                layers.append({"layer": path, "plan": m._fast_plan(), "input": list(xi.shape),
                               "dense_macs": r["dense_macs"], "dgc_macs": r["macs"],
                               "dense_ms": t["dense"]["min_ms"], "dgc_ms": t["dgc"]["min_ms"],
                               "dense_median_ms": t["dense"]["median_ms"], "dgc_median_ms": t["dgc"]["median_ms"]})
            layer_dense = sum(r["dense_ms"] for r in layers)
            layer_dgc = sum(r["dgc_ms"] for r in layers)
            layer_macs = sum(r["dgc_macs"] for r in layers) / sum(r["dense_macs"] for r in layers)
            run_ = {"ratio": ratio, "batch": batch,
                    "network": {"dense_ms": net["dense"]["min_ms"], "dgc_ms": net["dgc"]["min_ms"],
                                "dense_median_ms": net["dense"]["median_ms"], "dgc_median_ms": net["dgc"]["median_ms"],
                                "dense_macs": dense_cost.macs * batch, "dgc_macs": dgc_cost.macs * batch,
                                "speedup": net["dense"]["min_ms"] / net["dgc"]["min_ms"],
                                "macs_reduction": 1 / mac_ratio,
                                "realised_fraction": realised(net["dense"]["min_ms"], net["dgc"]["min_ms"], mac_ratio)},
                    "dgc_layers": {"dense_ms": layer_dense, "dgc_ms": layer_dgc, "speedup": layer_dense / layer_dgc,
                                   "macs_reduction": 1 / layer_macs,
                                   "realised_fraction": realised(layer_dense, layer_dgc, layer_macs)},
                    "layers": layers}
            results["runs"].append(run_)
            print(f"ξ={ratio} batch={batch}: network {run_['network']['dense_ms']:.1f} → {run_['network']['dgc_ms']:.1f} ms "
                  f"(×{run_['network']['speedup']:.2f}, MACs ×{run_['network']['macs_reduction']:.2f}); DGC layers "
                  f"{layer_dense:.1f} → {layer_dgc:.1f} ms (×{layer_dense / layer_dgc:.2f}, MACs ×{1 / layer_macs:.2f})",
                  flush=True)
    return results


def realised(t_dense: float, t_dgc: float, mac_ratio: float) -> float:
    """The fraction of the counted saving that the clock sees."""
    return (1 - t_dgc / t_dense) / (1 - mac_ratio) if mac_ratio < 1 else float("nan")


def markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [f"# DGC latency ({cfg['model']}, {cfg['size']}², {cfg['threads']} thread(s), CPU, {cfg['clock']} clock"
             f"{', quick smoke run' if cfg['quick'] else ''})", "", environment_line(results["environment"]), "",
             "Times are the minimum over alternating rounds (medians in the JSON). *realised* = "
             "(1 − t_dgc/t_dense) / (1 − MACs_dgc/MACs_dense): the share of the counted saving seen "
             "on the clock (goal ≥ 0.5 at batch 1).", ""]
    rows = []
    for r in results["runs"]:
        n, l = r["network"], r["dgc_layers"]
        rows.append([r["ratio"], r["batch"], f"{n['dense_ms']:.1f}", f"{n['dgc_ms']:.1f}", f"×{n['speedup']:.2f}",
                      f"×{n['macs_reduction']:.2f}", f"{n['realised_fraction']:.2f}", f"{l['dense_ms']:.1f}",
                      f"{l['dgc_ms']:.1f}", f"×{l['speedup']:.2f}", f"×{l['macs_reduction']:.2f}",
                      f"{l['realised_fraction']:.2f}"])
    lines.append(table(rows, ["ξ", "batch", "network dense ms", "network DGC ms", "speed-up", "MACs reduction",
                              "realised", "DGC layers dense ms", "DGC layers ms", "speed-up", "MACs reduction",
                              "realised"]))
    for r in results["runs"]:
        lines += ["", f"## Per layer, ξ = {r['ratio']}, batch {r['batch']}", ""]
        lines.append(table([[x["layer"], x["plan"], "×".join(map(str, x["input"])), f"{x['dense_macs'] / 1e6:.1f}",
                             f"{x['dgc_macs'] / 1e6:.1f}", f"{x['dense_ms']:.3f}", f"{x['dgc_ms']:.3f}",
                             f"×{x['dense_ms'] / x['dgc_ms']:.2f}"] for x in r["layers"]],
                           ["layer", "plan", "input", "dense MMACs", "DGC MMACs", "dense ms", "DGC ms", "speed-up"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 64² input, few repeats, batch 1 and 2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=30, help="rounds for the whole network")
    ap.add_argument("--layer-repeats", type=int, default=40, help="rounds per layer")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="wall time, or the thread's CPU time (with --threads 1, on a shared machine)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        ap.error("--clock thread measures one thread: use it with --threads 1")
    if args.quick:
        args.size, args.repeats, args.layer_repeats, args.ratios, args.batches = 64, 3, 3, [0.5], [1, 2]
    results = run(args)
    js, md = write_results("dgc_latency", results, markdown(results), args.out, quick=args.quick)
    print(f"wrote {js} and {md}")
    return results


if __name__ == "__main__":
    main()
