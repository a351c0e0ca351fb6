"""Trace and transform times of the core on resnet50 and densenet201 (random init, 1×3×224×224).

    python -m benchmarks.core_timings                # full: 5 repeats, writes benchmarks/results/core_timings.{json,md}
    python -m benchmarks.core_timings --quick        # smoke test: 1 repeat at 64×64, writes to a temp dir

Measured per model (median over repeats, wall clock):
* ``fx.symbolic_trace`` of the model (torch.fx alone, for reference);
* ``graphsel.trace(model, x)``: deep copy, tracing with auto-leafing, shape propagation;
* ``graphsel.transform(model, ["fuse_bn"], x)``: trace + the pass on a copy + lint + shape
  propagation + contract verification (example input + 2 random inputs), split into the pass
  itself and its verification as recorded in the pass history.
Timings are informative (they depend on the machine and its load); tests never assert them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.fx as fx
import torchvision
from tabulate import tabulate

import graphsel

MODELS = ("resnet50", "densenet201")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(name: str, size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size)
    rows: dict[str, list[float]] = {k: [] for k in ("fx_symbolic_trace", "graphsel_trace", "transform_total",
                                                     "transform_trace", "fuse_bn_pass", "fuse_bn_verify")}
    info: dict = {}
    for _ in range(repeats):
        _, t = _timed(lambda: fx.symbolic_trace(model))
        rows["fx_symbolic_trace"].append(t)
        gm, t = _timed(lambda: graphsel.trace(model, x))
        rows["graphsel_trace"].append(t)
        out, t = _timed(lambda: graphsel.transform(model, ["fuse_bn"], x))
        rows["transform_total"].append(t)
        meta = graphsel.graphsel_meta(out)
        rec = meta.history[-1]
        rows["transform_trace"].append(meta.trace_seconds)
        rows["fuse_bn_pass"].append(rec.seconds)
        rows["fuse_bn_verify"].append(rec.verify_seconds)
        info = {"nodes": len(gm.graph.nodes), "nodes_after_fuse_bn": rec.nodes_after, "fused": rec.stats["fused"],
                "skipped": rec.stats["skipped"], "max_abs_deviation": rec.max_abs, "params": rec.params_before,
                "params_after": rec.params_after}
    return {"model": name, "input": [1, 3, size, size], "repeats": repeats,
            "median_s": {k: statistics.median(v) for k, v in rows.items()},
            "min_s": {k: min(v) for k, v in rows.items()}, **info}


def to_markdown(results: list[dict], env: dict) -> str:
    head = ["model", "input", "nodes", "fx.symbolic_trace s", "graphsel.trace s", "transform(fuse_bn) s",
            "… pass s", "… verify s", "fused / skipped BN", "max deviation"]
    rows = []
    for r in results:
        m = r["median_s"]
        rows.append([r["model"], "x".join(map(str, r["input"])), r["nodes"], f"{m['fx_symbolic_trace']:.3f}",
                     f"{m['graphsel_trace']:.3f}", f"{m['transform_total']:.3f}", f"{m['fuse_bn_pass']:.3f}",
                     f"{m['fuse_bn_verify']:.3f}", f"{r['fused']} / {r['skipped']}", f"{r['max_abs_deviation']:.1e}"])
    lines = ["# Core timings", "",
             f"Median of {results[0]['repeats']} runs, wall clock; torch {env['torch']}, torchvision "
             f"{env['torchvision']}, {env['threads']} thread(s), {env['machine']} (1-min load average "
             f"{env['load_average_1min_at_end']} at the end: other processes inflate these numbers). "
             f"Random-init models in eval "
             f"mode. `transform` includes tracing, the pass, lint, shape propagation and verification on the "
             f"example input plus 2 random inputs.", "",
             tabulate(rows, headers=head, tablefmt="github"), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 repeat at 64x64, results to a temp dir")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=None, help="output folder (default: benchmarks/results)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 5)
    size = args.size or (64 if args.quick else 224)
    out_dir = args.out or (tempfile.mkdtemp(prefix="graphsel-core-timings-") if args.quick else RESULTS)
    os.makedirs(out_dir, exist_ok=True)
    results = []
    for name in MODELS:
        r = measure(name, size, repeats)
        print(f"{name}: trace {r['median_s']['graphsel_trace']:.3f} s, transform {r['median_s']['transform_total']:.3f} s",
              flush=True)
        results.append(r)
    env = {"torch": torch.__version__, "torchvision": torchvision.__version__, "threads": torch.get_num_threads(),
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cpus",
           "python": sys.version.split()[0], "quick": args.quick,
           "load_average_1min_at_end": round(os.getloadavg()[0], 2),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(os.path.join(out_dir, "core_timings.json"), "w") as f:
        json.dump({"env": env, "results": results}, f, indent=2)
    md = to_markdown(results, env)
    with open(os.path.join(out_dir, "core_timings.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
