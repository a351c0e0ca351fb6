"""Does onnxruntime run graphsel's slim ResNet-50 faster than Torch-Pruning's model of the same
shapes? A careful re-measurement of the gap ``prune_latency`` reported (1.5–1.8× at batch 1).

Both tools prune ResNet-50 (random initialisation, eval) at 50 % with L1 and ``round_to=8``
(identical conv shapes, checked). Each model is exported several ways:

* graphsel's model with ``graphsel.export(..., "onnx")`` (dynamo exporter, optimised, static
  batch), with ``prune_latency``'s exporter (dynamo, dynamic batch dimension) and with the
  legacy TorchScript exporter; graphsel's model after ``fuse_bn`` (BatchNorm folded);
* Torch-Pruning's model the same ways, and after BatchNorm folding.

**Structure.** Every export is loaded in onnxruntime with all graph optimisations and the graph
it runs is saved (``optimized_model_filepath``): its operator histogram and the shapes of its
convolution weights are compared with those of graphsel's export. Identical graphs cannot differ
in speed except by measurement.

**Timing** (same process, ``--threads`` intra-op threads, one inter-op thread, medians and
interquartile ranges of ``--repeats`` runs):

* ``prune_latency's order``: the arrangement that reported the gap (unpruned, graphsel r8,
  graphsel, TP r8, each called once per round right after the previous one; on ResNet-50 the two
  graphsel variants are the same network, here two sessions of one file), and the order
  reversed, with onnxruntime's spinning worker threads on and off: a difference between two
  sessions of the same file is the position in the round;
* ``interleaved + settle``: every export, one untimed call before each timed call;
* ``spinning off``: the same with ``session.intra_op.allow_spinning = 0``;
* ``blocked``: all runs of one export, then the next;
* ``optimisation level``: graphsel's and TP's exports at ``disable`` / ``basic`` / ``extended`` / ``all``;
* ``threads``: 1 and ``--threads`` intra-op threads.

Run: ``python -m benchmarks.ort_gap --structure-only`` (exports and graphs only, a few minutes,
any machine), ``python -m benchmarks.ort_gap`` (full: ResNet-50 at 224², 30 runs per cell, about 10 min on
2 quiet cores; run nothing else meanwhile) or ``--quick`` (ResNet-18 at 64², 3 runs: a smoke test).
Writes ``benchmarks/results/ort_gap{,_quick}.{json,md}``.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402


def _conv_shapes(model) -> list[tuple]:
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def build_models(name: str, size: int, ratio: float, round_to: int) -> tuple[dict[str, torch.nn.Module], dict]:
    import graphsel

    torch.manual_seed(0)
    dense = common.build_model(name)
    x = torch.randn(1, 3, size, size)
    gs = common.graphsel_prune(dense, (x,), ratio=ratio, round_to=round_to, scope="uniform", verify=False).eval()
    gs_fused = graphsel.transform(gs, ["fuse_bn"], (x,), verify=False).eval()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp = common.torch_pruning_prune(common.build_model(name), (x,), ratio=ratio, round_to=round_to)["model"].eval()
    tp_fused = graphsel.transform(tp, ["fuse_bn"], (x,), verify=False).eval()
    info = {"same_conv_shapes": _conv_shapes(gs) == _conv_shapes(tp),
            "macs": {k: common.human(graphsel.cost(m, (x,)).macs) for k, m in
                     (("unpruned", dense), ("graphsel", gs), ("TP", tp))}}
    return {"unpruned": dense, "graphsel": gs, "graphsel+fuse_bn": gs_fused, "TP": tp, "TP+fuse_bn": tp_fused}, info


def export_all(models: dict, size: int, tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, how) for every (model, exporter) pair."""
    import graphsel
    from benchmarks.prune_latency import export_onnx as dynamic_export

    x = torch.randn(1, 3, size, size)
    out: dict[str, tuple[Path, str]] = {}

    def legacy(m, path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (x,), str(path), dynamo=False)
        return "legacy"

    jobs: list[tuple[str, str, Callable]] = [
        ("unpruned: dynamic batch (prune_latency)", "unpruned", lambda m, p: dynamic_export(m, size, p)),
        ("graphsel: graphsel.export", "graphsel", lambda m, p: graphsel.export(m, p, "onnx", (x,), check=False).method),
        ("graphsel: dynamic batch (prune_latency)", "graphsel", lambda m, p: dynamic_export(m, size, p)),
        ("graphsel: legacy", "graphsel", legacy),
        ("graphsel+fuse_bn: graphsel.export", "graphsel+fuse_bn",
         lambda m, p: graphsel.export(m, p, "onnx", (x,), check=False).method),
        ("TP: dynamo static (as graphsel.export)", "TP",
         lambda m, p: graphsel.export(m, p, "onnx", (x,), check=False).method),
        ("TP: dynamic batch (prune_latency)", "TP", lambda m, p: dynamic_export(m, size, p)),
        ("TP: legacy", "TP", legacy),
        ("TP+fuse_bn: legacy", "TP+fuse_bn", legacy),
    ]
    for i, (label, model, fn) in enumerate(jobs):
        path = tmp / f"m{i}.onnx"
        t0 = time.perf_counter()
        how = fn(models[model], path)
        out[label] = (path, f"{how} ({time.perf_counter() - t0:.1f} s)")
        print(f"    exported {label}", flush=True)
    return out


def session(path: Path, threads: int, *, level: str = "all", spinning: bool = True, save_to: Path | None = None):
    """graphsel's onnxruntime session, spinning by default here: onnxruntime's own default, what
    prune_latency measured with."""
    from graphsel.analysis.latency import ort_session
    return ort_session(path, threads, spinning=spinning, level=level, save_to=save_to)


def structure(path: Path) -> dict[str, Any]:
    import onnx
    m = onnx.load(str(path))
    inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
    ops = collections.Counter((f"{n.domain.split('.')[-1]}:" if n.domain else "") + n.op_type
                              + "".join(f"+{a.s.decode()}" for a in n.attribute if a.name == "activation")
                              for n in m.graph.node)
    convs = [inits.get(n.input[1]) for n in m.graph.node if n.op_type in ("Conv", "FusedConv") and len(n.input) > 1]
    return {"nodes": len(m.graph.node), "ops": dict(sorted(ops.items())), "conv_weights": convs}


def compare_structures(exports: dict, threads: int, tmp: Path) -> dict[str, Any]:
    out = {}
    for label, (path, _) in exports.items():
        opt = tmp / (path.stem + ".ort.onnx")
        session(path, threads, save_to=opt)
        out[label] = {"exported": structure(path), "ort_optimised": structure(opt)}
    ref = out["graphsel: graphsel.export"]["ort_optimised"]
    for label, s in out.items():
        o = s["ort_optimised"]
        s["ort_graph_identical_to_graphsel_export"] = (o["ops"] == ref["ops"] and
                                                       sorted(map(str, o["conv_weights"])) ==
                                                       sorted(map(str, ref["conv_weights"])))
    return out


def _stats(samples: list[float]) -> dict[str, Any]:
    s = sorted(samples)
    q1, q3 = (statistics.quantiles(s, n=4)[0], statistics.quantiles(s, n=4)[2]) if len(s) >= 4 else (s[0], s[-1])
    return {"median_ms": statistics.median(s), "q1_ms": q1, "q3_ms": q3, "min_ms": s[0],
            "samples_ms": [round(v, 4) for v in samples]}


def time_interleaved(sessions: dict[str, Any], feed: np.ndarray, repeats: int, warmup: int, settle: int) -> dict:
    calls = {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed})) for k, s in sessions.items()}
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            for _ in range(settle):
                fn()
            t0 = time.perf_counter()
            fn()
            samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: _stats(v) for k, v in samples.items()}


def time_blocked(sessions: dict[str, Any], feed: np.ndarray, repeats: int, warmup: int) -> dict:
    out = {}
    for k, s in sessions.items():
        name = s.get_inputs()[0].name
        for _ in range(warmup):
            s.run(None, {name: feed})
        v = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            s.run(None, {name: feed})
            v.append((time.perf_counter() - t0) * 1e3)
        out[k] = _stats(v)
    return out


def run(args) -> dict[str, Any]:
    threads = common.set_threads(args.threads)
    models, info = build_models(args.model, args.size, args.ratio, args.round_to)
    print(f"  models built; identical conv shapes: {info['same_conv_shapes']}", flush=True)
    res: dict[str, Any] = {"models": info, "timing": {}}
    with tempfile.TemporaryDirectory(prefix="graphsel-ortgap-") as tmp:
        tmp = Path(tmp)
        exports = export_all(models, args.size, tmp)
        res["exports"] = {k: how for k, (_, how) in exports.items()}
        res["structure"] = compare_structures(exports, threads, tmp)
        if args.structure_only:
            return res
        feed = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(2)).numpy()
        outs = {}
        for k, (p, _) in exports.items():
            if not k.startswith("unpruned"):
                outs[k] = session(p, threads).run(None, {session(p, threads).get_inputs()[0].name: feed})[0]
        ref = outs["graphsel: graphsel.export"]
        tp_ref = outs["TP: legacy"]
        res["max_abs_vs_graphsel_export"] = {k: float(np.abs(v - (ref if k.startswith("graphsel") else tp_ref)).max())
                                            for k, v in outs.items()}
        R, W = args.repeats, args.warmup
        cells = res["timing"]
        # 1. the arrangement of prune_latency: unpruned, graphsel r8, graphsel, TP r8, each called once
        # per round right after the previous one, spinning on. For ResNet-50 "graphsel" and
        # "graphsel r8" are the same network: here two sessions of the same file, so that any
        # difference between them is the position in the round. Then the order reversed.
        u, g, t = ("unpruned: dynamic batch (prune_latency)", "graphsel: dynamic batch (prune_latency)",
                   "TP: dynamic batch (prune_latency)")
        for label, order in (("prune_latency's order", [("unpruned", u), ("graphsel (2nd)", g), ("graphsel again (3rd)", g),
                                                         ("TP (4th)", t)]),
                             ("reversed", [("unpruned", u), ("TP (2nd)", t), ("graphsel (3rd)", g),
                                           ("graphsel again (4th)", g)])):
            for spinning in (True, False):
                sess = {name: session(exports[k][0], threads, spinning=spinning) for name, k in order}
                cells[f"{label}, no settle, spinning {'on' if spinning else 'off'}"] = time_interleaved(
                    sess, feed, R, W, settle=0)
                del sess
        print("    timed the prune_latency arrangement", flush=True)
        # 2. every export, interleaved with a settling call / spinning off / blocked
        slim = [k for k in exports if not k.startswith("unpruned")]
        cells["every export, interleaved + settle"] = time_interleaved(
            {k: session(exports[k][0], threads) for k in slim}, feed, R, W, settle=1)
        cells["every export, interleaved, spinning off"] = time_interleaved(
            {k: session(exports[k][0], threads, spinning=False) for k in slim}, feed, R, W, settle=0)
        cells["every export, blocked"] = time_blocked({k: session(exports[k][0], threads) for k in slim}, feed, R, W)
        print("    timed every export", flush=True)
        # 3. optimisation levels and threads for the two headline exports
        pair = ("graphsel: graphsel.export", "TP: dynamo static (as graphsel.export)")
        for level in ("disable", "basic", "extended", "all"):
            cells[f"level {level}, interleaved + settle"] = time_interleaved(
                {k: session(exports[k][0], threads, level=level) for k in pair}, feed, R, W, settle=1)
        for t in sorted({1, threads}):
            cells[f"{t} thread(s), interleaved + settle"] = time_interleaved(
                {k: session(exports[k][0], t) for k in pair}, feed, R, W, settle=1)
        print("    timed levels and threads", flush=True)
    return res


def markdown(results: dict) -> str:
    cfg, env, r = results["config"], results["environment"], results["result"]
    lines = [f"# onnxruntime: graphsel's export vs Torch-Pruning's same-shape model"
             f"{' (quick smoke run)' if cfg['quick'] else ''}", "",
             f"{cfg['model']} at {cfg['size']}², batch 1, pruned 50 % (L1, uniform, round_to={cfg['round_to']}) by both "
             f"tools; identical conv shapes: {r['models']['same_conv_shapes']}; MACs {r['models']['macs']}. "
             f"{cfg['threads']} intra-op thread(s); {cfg['repeats']} timed runs per cell after {cfg['warmup']} warm-up(s); "
             "median [IQR] ms.", "", common.environment_line(env), "", "## Exports and the graph onnxruntime runs", ""]
    rows = []
    for k, s in r["structure"].items():
        o = s["ort_optimised"]
        rows.append([k, r["exports"][k], s["exported"]["nodes"], o["nodes"],
                     ", ".join(f"{op} {n}" for op, n in o["ops"].items()),
                     "yes" if s["ort_graph_identical_to_graphsel_export"] else "no"])
    lines.append(common.table(rows, ["export", "how", "nodes", "nodes after ORT_ENABLE_ALL", "ops after optimisation",
                                     "same as graphsel.export's"]))
    if "max_abs_vs_graphsel_export" in r:
        lines += ["", "Max |output − graphsel.export's| (graphsel variants) or − TP legacy's (TP variants): " +
                  "; ".join(f"{k} {v:.1e}" for k, v in r["max_abs_vs_graphsel_export"].items()) + "."]
    if not r.get("timing"):
        lines += ["", "(structure only: no timing in this run)"]
        return "\n".join(lines) + "\n"
    lines += ["", "## Timing", ""]
    rows = []
    for cell, t in r["timing"].items():
        for k, v in t.items():
            rows.append([cell, k, f"{v['median_ms']:.2f}", f"{v['q1_ms']:.2f}–{v['q3_ms']:.2f}", f"{v['min_ms']:.2f}"])
    lines.append(common.table(rows, ["setting", "export", "median ms", "IQR ms", "min ms"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: resnet18 at 64², 3 runs per cell")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--structure-only", action="store_true",
                    help="export and compare the graphs onnxruntime runs; no timing (fine on a busy machine)")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.size, args.repeats, args.warmup = "resnet18", 64, 3, 1
    results = {"config": {"model": args.model, "size": args.size, "ratio": args.ratio, "round_to": args.round_to,
                          "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
                          "structure_only": args.structure_only},
               "environment": common.environment()}
    results["result"] = run(args)
    stem = "ort_gap_structure" if args.structure_only else "ort_gap"
    js, md = common.write_results(stem, results, markdown(results), args.out, args.quick)
    print(f"wrote {js} and {md}")
    return results


if __name__ == "__main__":
    main()
