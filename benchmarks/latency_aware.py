"""Latency-aware pruning against uniform 50 % pruning, at the same measured latency, on the fastest runtime.

Models (random initialisation, eval, 224²): resnet50, densenet121, mobilenet_v2, convnext_tiny,
efficientnet_b0; batch 1 and 32. Per model and batch:

1. ``dense`` and ``uniform`` (``prune(ratio=0.5, criterion="l1", scope="uniform", round_to=8)`` →
   ``fold_masks`` → ``materialize``: the recipe of ``prune_latency``, chosen by channel count, i.e.
   by MACs) are timed in every runtime of ``--runtimes`` (eager, inductor, onnxruntime; AOTInductor
   with ``--runtimes ... aoti``) in the same process with the same threads; the runtime where
   ``uniform`` is fastest is *the fastest runtime*;
2. ``latency-aware``: ``prune(target_latency="<uniform's ms>ms", runtime=LatencyTable(<runtime>,
   batch=<batch>))`` → ``fold_masks`` → ``materialize`` on the fastest runtime (every runtime with
   ``--all-runtimes``): the widths chosen by L1 importance lost per millisecond from the runtime's
   layer tables, measured end to end and corrected (see ``graphsel.passes.prune_latency``);
3. ``dense``, ``uniform`` and ``latency-aware`` are timed again interleaved on that runtime.

Reported per cell: params and MACs kept, median latency, *speed-up* = t_dense / t, *MACs ratio* =
MACs_dense / MACs, *realised* = speed-up / MACs ratio (goal ≥ 0.8), and whether the latency-aware
model met its target (the uniform model's latency) within 10 % in the final timing. The latency
tables are cached (``$GRAPHSEL_CACHE_DIR/latency``): a second run re-measures nothing.

Run: ``python -m benchmarks.latency_aware`` (full: 1–3 h on 2 quiet cores, most of it compiling
for inductor and measuring batch-32 layer tables; ``--runtimes eager onnxruntime`` for well under
an hour) or ``--quick`` (resnet18 + mobilenet_v2 at 64², batch 1 and 4, eager + onnxruntime, 3
runs: a smoke test). Writes ``benchmarks/results/latency_aware{,_quick}.{json,md}``.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

MODELS = ["resnet50", "densenet121", "mobilenet_v2", "convnext_tiny", "efficientnet_b0"]
QUICK_MODELS = ["resnet18", "mobilenet_v2"]
RUNTIMES = ["eager", "inductor", "onnxruntime"]
GOAL_REALISED = 0.8
TOLERANCE = 0.10


def _cost(model, x) -> dict[str, int]:
    import graphsel
    c = graphsel.cost(model, (x,))
    return {"params": c.params, "macs": c.macs}


def _runner(model, x, runtime, threads):
    from graphsel.analysis.latency import prepare_runtime
    return prepare_runtime(model, (x,), runtime, threads=threads)


def _time(runners: dict, args, threads) -> dict[str, dict[str, float]]:
    from graphsel.analysis.latency import time_runners
    t = time_runners({k: r.run for k, r in runners.items()}, repeats=args.repeats, warmup=args.warmup, settle=1,
                     threads=threads)
    return {k: {"median_ms": v.median_ms, "q1_ms": v.q1_ms, "q3_ms": v.q3_ms, "min_ms": v.min_ms} for k, v in t.items()}


def latency_aware(dense, x1, runtime, batch, target_ms, args, threads):
    import graphsel
    from graphsel.analysis.latency import LatencyTable

    table = LatencyTable(runtime, threads=threads, batch=batch, progress=None, repeats=args.repeats)
    opts = {"target_latency": f"{target_ms:.6f}ms", "runtime": table, "criterion": "l1"}
    t0 = time.perf_counter()
    gm = graphsel.transform(dense, [("prune", opts), "fold_masks", "materialize"], (x1,), verify=args.verify,
                            progress=False)
    seconds = time.perf_counter() - t0
    stats = graphsel.graphsel_meta(gm).history[0].stats.get("latency", {})
    return gm.eval(), stats, seconds


def run_model(name: str, args, threads: int) -> dict[str, Any]:
    from graphsel.analysis.latency import RuntimeUnavailable

    torch.manual_seed(0)
    dense = common.build_model(name)
    x1 = torch.randn(1, 3, args.size, args.size)
    uniform = common.graphsel_prune(dense, (x1,), ratio=0.5, round_to=8, scope="uniform", verify=args.verify).eval()
    rec: dict[str, Any] = {"model": name, "cost": {"dense": _cost(dense, x1), "uniform": _cost(uniform, x1)},
                           "cells": []}
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(2))
        # 1. dense and uniform in every runtime; the fastest for the uniform model
        prepared: dict[str, dict] = {}
        first: dict[str, Any] = {}
        for rt in args.runtimes:
            try:
                prepared[rt] = {"dense": _runner(dense, x, rt, threads), "uniform": _runner(uniform, x, rt, threads)}
                first[rt] = _time(prepared[rt], args, threads)
            except RuntimeUnavailable as e:
                first[rt] = {"unavailable": e.reason}
            print(f"    batch {batch:>2} {rt:<12} " + (
                "unavailable" if "unavailable" in first[rt] else
                "  ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in first[rt].items())), flush=True)
        ok = [rt for rt in args.runtimes if "unavailable" not in first[rt]]
        if not ok:
            continue
        fastest = min(ok, key=lambda rt: first[rt]["uniform"]["median_ms"])
        for rt in (ok if args.all_runtimes else [fastest]):
            cell: dict[str, Any] = {"batch": batch, "runtime": rt, "fastest": rt == fastest,
                                    "all_runtimes": first}
            try:
                target = first[rt]["uniform"]["median_ms"]
                la, stats, secs = latency_aware(dense, x1, rt, batch, target, args, threads)
                cell["latency_aware"] = {"stats": stats, "prune_seconds": secs, **_cost(la, x1)}
                runners = dict(prepared[rt])
                runners["latency-aware"] = _runner(la, x, rt, threads)
                t = _time(runners, args, threads)
                cell["timing"] = t
                dm = rec["cost"]["dense"]["macs"]
                costs = {"dense": rec["cost"]["dense"], "uniform": rec["cost"]["uniform"],
                         "latency-aware": {"params": cell["latency_aware"]["params"],
                                           "macs": cell["latency_aware"]["macs"]}}
                for k, v in t.items():
                    v["speedup"] = t["dense"]["median_ms"] / v["median_ms"]
                    v["macs_ratio"] = dm / costs[k]["macs"]
                    v["realised"] = v["speedup"] / v["macs_ratio"]
                    v.update(costs[k])
                err = t["latency-aware"]["median_ms"] / t["uniform"]["median_ms"] - 1
                cell["target_error"] = err
                cell["target_met"] = abs(err) <= TOLERANCE
                del runners["latency-aware"], la
                print(f"    batch {batch:>2} {rt:<12} latency-aware {t['latency-aware']['median_ms']:.2f} ms "
                      f"(uniform {t['uniform']['median_ms']:.2f}; {err:+.1%}); realised "
                      f"{t['uniform']['realised']:.2f} → {t['latency-aware']['realised']:.2f}; MACs kept "
                      f"{common.human(costs['uniform']['macs'])} → {common.human(costs['latency-aware']['macs'])}",
                      flush=True)
            except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                cell["error"] = common.error_record(e, frames=12)
                print(f"    batch {batch:>2} {rt:<12} FAILED: {common.short_error(cell['error'])}", flush=True)
                traceback.print_exc()
            rec["cells"].append(cell)
        del prepared
        gc.collect()
    return rec


def markdown(results: dict) -> str:
    cfg, env = results["config"], results["environment"]
    lines = [f"# Latency-aware vs uniform pruning at the same measured latency{' (quick smoke run)' if cfg['quick'] else ''}",
             "", f"{cfg['size']}² input; {cfg['threads']} thread(s) for every runtime; medians of {cfg['repeats']} "
             f"interleaved runs (one settling call before each) after {cfg['warmup']} warm-up(s). *uniform*: "
             "`prune(ratio=0.5, l1, uniform, round_to=8)` → `fold_masks` → `materialize`; *latency-aware*: "
             "`prune(target_latency=<uniform's measured ms>, runtime=LatencyTable(<runtime>, batch=<batch>))` "
             "→ `fold_masks` → `materialize`, on the runtime where the uniform model is fastest"
             f"{' (and on every runtime)' if cfg['all_runtimes'] else ''}. *realised* = speed-up / MACs ratio "
             f"(goal ≥ {GOAL_REALISED}: ✅/❌); *target*: the latency-aware model's latency against the uniform "
             f"model's in the final timing (goal within ±{TOLERANCE:.0%}).", "", common.environment_line(env), ""]
    rows, all_rows = [], []
    for r in results["models"]:
        for c in r["cells"]:
            for rt, t in c["all_runtimes"].items():
                if c["fastest"]:
                    all_rows.append([r["model"], c["batch"], rt, t.get("unavailable", "") and "unavailable: " +
                                     t["unavailable"][:60] or f"{t['dense']['median_ms']:.2f}",
                                     "" if "unavailable" in t else f"{t['uniform']['median_ms']:.2f}",
                                     "◀" if rt == c["runtime"] else ""])
            if "error" in c:
                rows.append([r["model"], c["batch"], c["runtime"], "error: " + common.short_error(c["error"], 80)]
                            + [""] * 8)
                continue
            t = c["timing"]
            u, la = t["uniform"], t["latency-aware"]
            mark = lambda v: f"{v:.2f}" + (" ✅" if v >= GOAL_REALISED else " ❌")  # noqa: E731
            rows.append([r["model"], c["batch"], c["runtime"] + (" (fastest)" if c["fastest"] else ""),
                         f"{t['dense']['median_ms']:.2f}", f"{u['median_ms']:.2f}", f"{la['median_ms']:.2f}",
                         f"{c['target_error']:+.1%}" + (" ✅" if c["target_met"] else " ❌"),
                         f"{common.human(u['params'])} / {common.human(u['macs'])}",
                         f"{common.human(la['params'])} / {common.human(la['macs'])}",
                         mark(u["realised"]), mark(la["realised"])])
    lines.append(common.table(rows, ["model", "batch", "runtime", "dense ms", "uniform ms", "latency-aware ms",
                                     "vs target", "uniform params / MACs", "latency-aware params / MACs",
                                     "realised uniform", "realised latency-aware"]))
    lines += ["", "## Dense and uniform in every runtime (the fastest for the uniform model marked)", ""]
    lines.append(common.table(all_rows, ["model", "batch", "runtime", "dense ms", "uniform ms", "fastest"]))
    cells = [c for r in results["models"] for c in r["cells"] if "timing" in c and c["fastest"]]
    if cells:
        met = sum(c["timing"]["latency-aware"]["realised"] >= GOAL_REALISED for c in cells)
        tm = sum(c["target_met"] for c in cells)
        more = sum(c["timing"]["latency-aware"]["macs"] > c["timing"]["uniform"]["macs"] for c in cells)
        lines += ["", "## Goal check (fastest runtime)", "",
                  f"realised ≥ {GOAL_REALISED}: {met}/{len(cells)} cells; target met within ±{TOLERANCE:.0%}: "
                  f"{tm}/{len(cells)}; latency-aware keeps more MACs than uniform: {more}/{len(cells)}.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: resnet18 + mobilenet_v2, 64², batch 1 and 4")
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--runtimes", nargs="+", default=RUNTIMES, help="eager inductor aoti onnxruntime")
    ap.add_argument("--all-runtimes", action="store_true", help="latency-aware pruning on every runtime, not "
                                                                "only the fastest")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per model (interleaved)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: torch's)")
    ap.add_argument("--verify", action="store_true", help="verify graphsel's passes while pruning (slower)")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.batches, args.repeats, args.warmup = 64, [1, 4], 3, 1
        if args.runtimes == RUNTIMES:
            args.runtimes = ["eager", "onnxruntime"]
    threads = common.set_threads(args.threads)
    names = args.models or (QUICK_MODELS if args.quick else MODELS)
    results = {"config": {"size": args.size, "batches": args.batches, "runtimes": args.runtimes,
                          "all_runtimes": args.all_runtimes, "repeats": args.repeats, "warmup": args.warmup,
                          "threads": threads, "quick": args.quick, "models": names, "verify": args.verify},
               "environment": common.environment(), "models": []}
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}", flush=True)
        results["models"].append(run_model(name, args, threads))
        common.write_results("latency_aware", results, markdown(results), args.out, args.quick)
    js, md = common.write_results("latency_aware", results, markdown(results), args.out, args.quick)
    print(f"wrote {js} and {md}")
    return results


if __name__ == "__main__":
    main()
