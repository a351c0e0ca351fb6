"""Speed of the channel compiler: graphsel's trace → analysis → prune → fold → materialize against
Torch-Pruning's dependency-graph build → prune.

Models (random initialisation, eval, 224², batch 1): resnet50, resnet152, densenet201,
convnext_base, efficientnet_b4, regnet_y_16gf, mobilenet_v3_large, vit_b_16. Both tools prune 50 %
of the channels of every prunable layer by L1 norm (graphsel: ``prune(ratio=0.5, criterion="l1",
scope="uniform")``; Torch-Pruning: its standard recipe, see :mod:`benchmarks.common`), in the same
process, alternating run by run. Each figure is the median of ``--repeats`` runs; the model's
construction is not timed (each Torch-Pruning run gets a fresh deep copy, untimed; graphsel copies
the model's modules inside ``transform``, timed — with ``verify=False`` the copy shares the
parameters until the end, when those still shared are cloned).

graphsel is timed three times: ``verify=False`` (the compiler alone — the figure compared with
Torch-Pruning), ``verify=True`` (plus checking every pass against its reference on the example
and two random inputs: the mask oracle for ``fold_masks`` and ``materialize``) and ``verify=True``
with ``n_random_inputs=0`` (the example input only). The verified compiler's goal (issue 17): no
slower than Torch-Pruning's unchecked run on every model. The forwards verification runs per pass
are counted once per model (calls of the model's first convolution, by pass). Stage times come from the pipeline's records (``trace``; ``prune``
includes the channel analysis, also timed on its own; ``pipeline_overhead`` = shape signatures,
cost reports, invariant checks, recompiling, un-sharing parameters; with ``verify=True`` also a
copy of the graph per pass and a shape propagation after materialize). The goal (issue 3): ≥ 10× faster than Torch-Pruning on
densenet201 and never slower. Where graphsel misses it, one more graphsel run is profiled with
cProfile and the top functions (file:line:function, seconds) are written out (``--profile all``
profiles every model).

Run: ``python -m benchmarks.prune_speed`` (full: about 5 min on 2 quiet cores, most of it Torch-Pruning on densenet201) or ``--quick``
(resnet18 + mobilenet_v3_small, 1 run). Writes ``benchmarks/results/prune_speed{,_quick}.{json,md}``.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

MODELS = ["resnet50", "resnet152", "densenet201", "convnext_base", "efficientnet_b4", "regnet_y_16gf",
          "mobilenet_v3_large", "vit_b_16"]
QUICK_MODELS = ["resnet18", "mobilenet_v3_small"]
GOAL = {"densenet201": 10.0}   # required speed-up over Torch-Pruning; 1.0 (never slower) elsewhere


def goal_of(name: str) -> float:
    return GOAL.get(name, 1.0)


def graphsel_run(model, example, args, verify: bool, n_random_inputs: int = 2) -> dict[str, float]:
    import graphsel
    t0 = time.perf_counter()
    gm = graphsel.transform(model, common.prune_passes(args.ratio, None, "uniform"), example, verify=verify,
                            progress=False, n_random_inputs=n_random_inputs)
    total = time.perf_counter() - t0
    times = common.graphsel_times(gm, total)
    del gm
    return times


def verification_forwards(model, example, args) -> dict[str, int]:
    """Forwards per phase of one verified run: calls of the model's first convolution (every
    forward, plain, oracle or shape propagation, calls it once), by the pass that ran them."""
    import torch.nn as nn
    from graphsel.pipeline import phases

    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    shape = tuple(first.weight.shape[1:])                 # (its outputs may be pruned; its inputs are the image)
    calls = {"n": 0}
    per: dict[str, int] = {}
    orig_conv, orig_run = nn.Conv2d._conv_forward, phases.run_pass

    def conv(self, x, w, b):
        if tuple(w.shape[1:]) == shape and x.shape[1] == first.in_channels:
            calls["n"] += 1
        return orig_conv(self, x, w, b)

    def run_pass(p, *a, **k):
        before = calls["n"]
        try:
            return orig_run(p, *a, **k)
        finally:
            per[p.name] = per.get(p.name, 0) + calls["n"] - before
    nn.Conv2d._conv_forward, phases.run_pass = conv, run_pass
    try:
        graphsel_run(model, example, args, verify=True)
    finally:
        nn.Conv2d._conv_forward, phases.run_pass = orig_conv, orig_run
    return {"trace": calls["n"] - sum(per.values()), **per}


def analysis_seconds(model, example) -> float:
    import graphsel
    from graphsel.analysis.channels import analyze_channels
    gm = graphsel.trace(model, example)
    t0 = time.perf_counter()
    analyze_channels(gm)
    return time.perf_counter() - t0


def tp_run(model, example, args) -> dict[str, float]:
    fresh = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = common.torch_pruning_prune(fresh, example, ratio=args.ratio)
    with torch.no_grad():
        res["model"].eval()(*example)        # the pruned model runs (not timed)
    out = {"build": res["build_s"], "prune": res["prune_s"], "total": res["build_s"] + res["prune_s"]}
    del res, fresh
    return out


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _where(func: tuple) -> str:
    """``file:line:function`` with the path relative to the repository or to site-packages."""
    file, line, name = func
    if file == "~":                          # a builtin
        return name
    p = Path(file)
    for root in (Path(torch.__file__).parent.parent, common.ROOT):
        if p.is_relative_to(root):
            return f"{p.relative_to(root)}:{line}:{name}"
    return f"{file}:{line}:{name}"


def profile_graphsel(model, example, args, top: int) -> dict[str, Any]:
    """One verify=False graphsel run under cProfile: the top functions by own time and, among
    graphsel's own files, by cumulative time."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    gm = common.graphsel_prune(model, example, ratio=args.ratio, scope="uniform", verify=False)
    prof.disable()
    wall = time.perf_counter() - t0
    del gm
    st = pstats.Stats(prof)
    rows = [{"where": _where(f), "ncalls": nc, "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4)}
            for f, (cc, nc, tt, ct, callers) in st.stats.items()]
    own = [r for r in rows if r["where"].startswith(("graphsel/", "passes/"))]
    return {"wall_s_profiled": wall,
            "by_tottime": sorted(rows, key=lambda r: -r["tottime_s"])[:top],
            "graphsel_by_cumtime": sorted(own, key=lambda r: -r["cumtime_s"])[:top]}


def warm_up(args) -> None:
    """Run both tools once on a small model, untimed: module imports and first-call caches
    (pass registry, lazy imports) are not charged to the first measured model."""
    torch.manual_seed(0)
    model = common.build_model("resnet18")
    example = (torch.randn(1, 3, 32, 32),)
    graphsel_run(model, example, args, verify=True)
    tp_run(model, example, args)


def run_model(name: str, args) -> dict[str, Any]:
    torch.manual_seed(0)
    model = common.build_model(name)
    torch.manual_seed(1)
    example = (torch.randn(1, 3, args.size, args.size),)
    rec: dict[str, Any] = {"model": name, "input": args.size, "params": common.count_params(model)}
    gs, tp, tp_err = [], [], None
    for _ in range(args.repeats):
        gs.append(graphsel_run(model, example, args, verify=False))
        gc.collect()
        if tp_err is None:
            try:
                with common.time_limit(args.timeout):
                    tp.append(tp_run(model, example, args))
            except Exception as e:  # noqa: BLE001
                tp_err = common.error_record(e)
            gc.collect()
    rec["graphsel"] = {"median": medians(gs), "runs": gs}
    rec["graphsel"]["median"]["analysis_alone"] = analysis_seconds(model, example)
    gv, gv0 = [], []
    try:
        for _ in range(args.verify_repeats):
            gv.append(graphsel_run(model, example, args, verify=True))
            gc.collect()
            gv0.append(graphsel_run(model, example, args, verify=True, n_random_inputs=0))
            gc.collect()
        rec["graphsel_verified"] = {"median": medians(gv), "runs": gv}
        rec["graphsel_verified_example_only"] = {"median": medians(gv0), "runs": gv0}
        rec["verification_forwards"] = verification_forwards(model, example, args)
    except Exception as e:  # noqa: BLE001
        rec["graphsel_verified"] = {"error": common.error_record(e, frames=12)}
        rec["graphsel_verified_example_only"] = {"error": rec["graphsel_verified"]["error"]}
    if tp:
        rec["torch_pruning"] = {"median": medians(tp), "runs": tp}
        t_tp = rec["torch_pruning"]["median"]["total"]
        rec["speedup"] = t_tp / rec["graphsel"]["median"]["total"]
        if gv:
            rec["speedup_verified"] = t_tp / rec["graphsel_verified"]["median"]["total"]
            rec["speedup_verified_example_only"] = t_tp / rec["graphsel_verified_example_only"]["median"]["total"]
            rec["verified_no_slower"] = rec["speedup_verified"] >= 1.0
        rec["goal"] = goal_of(name)
        rec["meets_goal"] = rec["speedup"] >= rec["goal"]
    else:
        rec["torch_pruning"] = {"error": tp_err}
    want_profile = args.profile == "all" or (args.profile == "auto" and not rec.get("meets_goal", True))
    if want_profile:
        rec["profile"] = profile_graphsel(model, example, args, args.profile_top)
    del model
    gc.collect()
    return rec


def markdown(results: dict) -> str:
    cfg, env = results["config"], results["environment"]
    lines = [f"# Channel-compiler speed: graphsel vs Torch-Pruning at {cfg['ratio']:.0%}"
             f"{' (quick smoke run)' if cfg['quick'] else ''}", "",
             f"Wall seconds, median of {cfg['repeats']} run(s) (verify=True: {cfg['verify_repeats']}); "
             f"{cfg['size']}² input, batch 1; L1 criterion, per-layer ratio, same process, runs alternating. "
             "graphsel = trace + channel analysis + prune + fold_masks + materialize (`transform(..., verify=False)`, "
             "including its copy of the model); Torch-Pruning = `DependencyGraph` build (pruner construction) + "
             "`pruner.step()`. *speed-up* = TP / graphsel (goal: ≥ 10× on densenet201, ≥ 1× everywhere); "
             "*verified*: the same with `verify=True` (example + 2 random inputs; goal: ≥ 1× everywhere, ✅/❌) and "
             "with `n_random_inputs=0` (example input only). *forwards*: per pass, the forwards verification ran "
             "(trace / prune / fold_masks / materialize).", "",
             common.environment_line(env), ""]
    rows = []
    for r in results["models"]:
        g, t = r["graphsel"]["median"], r["torch_pruning"].get("median")
        gv = r["graphsel_verified"].get("median")
        gv0 = r.get("graphsel_verified_example_only", {}).get("median")
        fw = r.get("verification_forwards")
        rows.append([
            r["model"], common.human(r["params"]),
            f"{g['total']:.2f}", f"{gv['total']:.2f}" if gv else "error",
            f"{t['build']:.2f}" if t else "—", f"{t['prune']:.2f}" if t else "—", f"{t['total']:.2f}" if t else
            "error: " + common.short_error(r["torch_pruning"]["error"], 60),
            f"×{r['speedup']:.1f}" if "speedup" in r else "—",
            (f"×{r['speedup_verified']:.2f}" + (" ✅" if r["verified_no_slower"] else " ❌"))
            if "speedup_verified" in r else "—",
            f"{gv0['total']:.2f} (×{r['speedup_verified_example_only']:.2f})" if gv0 and
            "speedup_verified_example_only" in r else "—",
            " / ".join(str(v) for v in fw.values()) if fw else "—",
            (("✅" if r["meets_goal"] else "❌") + f" ≥ ×{r['goal']:g}") if "meets_goal" in r else "—",
        ])
    lines.append(common.table(rows, ["model", "params", "graphsel s", "graphsel + verify s", "TP build s",
                                     "TP prune s", "TP s", "speed-up", "speed-up (graphsel verified)",
                                     "verified, example input only s (speed-up)", "forwards", "goal"]))
    lines += ["", "## graphsel stages (median seconds, verify=False; verify column from the verified runs)", ""]
    stage_rows = []
    for r in results["models"]:
        g = r["graphsel"]["median"]
        gv = r["graphsel_verified"].get("median", {})
        stage_rows.append([r["model"], f"{g['trace']:.2f}", f"{g['analysis_alone']:.2f}", f"{g['prune']:.2f}",
                           f"{g['fold_masks']:.2f}", f"{g['materialize']:.2f}", f"{g['pipeline_overhead']:.2f}",
                           f"{g['total']:.2f}", f"{gv['verify']:.2f}" if gv else "—"])
    lines.append(common.table(stage_rows, ["model", "trace", "analysis (alone)", "prune (incl. analysis)",
                                           "fold_masks", "materialize", "pipeline overhead", "total", "verify"]))
    errors = [r for r in results["models"] if "error" in r["graphsel_verified"]]
    for r in errors:
        e = r["graphsel_verified"]["error"]
        lines += ["", f"### graphsel verify=True failed on {r['model']}", "", "```", f"{e['type']}: {e['message']}", "```"]
    for r in results["models"]:
        if "profile" not in r:
            continue
        p = r["profile"]
        lines += ["", f"## Profile: {r['model']} (graphsel, verify=False, {p['wall_s_profiled']:.2f} s under cProfile)",
                  "", "Top functions by own time:", ""]
        lines.append(common.table([[x["where"], x["ncalls"], f"{x['tottime_s']:.3f}", f"{x['cumtime_s']:.3f}"]
                                   for x in p["by_tottime"]], ["file:line:function", "calls", "own s", "cumulative s"]))
        lines += ["", "graphsel's own functions by cumulative time:", ""]
        lines.append(common.table([[x["where"], x["ncalls"], f"{x['tottime_s']:.3f}", f"{x['cumtime_s']:.3f}"]
                                   for x in p["graphsel_by_cumtime"]],
                                  ["file:line:function", "calls", "own s", "cumulative s"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"smoke test: {', '.join(QUICK_MODELS)}, 1 run")
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3, help="runs per tool (verify=False and Torch-Pruning)")
    ap.add_argument("--verify-repeats", type=int, default=1, help="graphsel runs with verify=True")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per Torch-Pruning run before giving up")
    ap.add_argument("--profile", choices=["auto", "all", "none"], default="auto",
                    help="cProfile graphsel where it misses the goal (auto), everywhere, or nowhere")
    ap.add_argument("--profile-top", type=int, default=25)
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.verify_repeats = 1, 1
    common.set_threads(args.threads)
    names = args.models or (QUICK_MODELS if args.quick else MODELS)
    results = {"config": {"ratio": args.ratio, "size": args.size, "repeats": args.repeats,
                          "verify_repeats": args.verify_repeats, "quick": args.quick, "models": names,
                          "profile": args.profile},
               "environment": common.environment(), "models": []}
    warm_up(args)
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}", flush=True)
        rec = run_model(name, args)
        results["models"].append(rec)
        g = rec["graphsel"]["median"]["total"]
        t = rec["torch_pruning"].get("median", {}).get("total")
        print(f"    graphsel {g:.2f} s; TP {t:.2f} s; ×{rec['speedup']:.1f}" if t else
              f"    graphsel {g:.2f} s; TP failed: {common.short_error(rec['torch_pruning']['error'])}", flush=True)
        common.write_results("prune_speed", results, markdown(results), args.out, args.quick)
    js, md = common.write_results("prune_speed", results, markdown(results), args.out, args.quick)
    print(f"wrote {js} and {md}")
    return results


if __name__ == "__main__":
    main()
