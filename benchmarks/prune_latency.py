"""Slim-model latency: do the removed MACs show on the clock? graphsel vs Torch-Pruning on CPU.

Models (random initialisation, eval): resnet50, densenet121, mobilenet_v2, convnext_tiny,
efficientnet_b0. Variants, all at a 50 % channel ratio (L1, per layer):

* ``unpruned``;
* ``graphsel r8``: ``prune(ratio=0.5, round_to=8)`` → ``fold_masks`` → ``materialize``;
* ``graphsel``: the same without ``round_to``;
* ``TP r8``: Torch-Pruning's standard recipe with ``round_to=8``.

Each variant runs eager (``torch.inference_mode``) and in onnxruntime (CPU provider, all graph
optimisations; exported with ``torch.onnx.export(..., dynamo=True)`` and a dynamic batch
dimension, or the legacy TorchScript exporter when that fails — the JSON records which), at batch
1 and 32 (224²). Per backend and batch the variants alternate round by round after a warm-up;
the minimum is reported (medians in the JSON). In the same run: *speed-up* = t_unpruned /
t_variant, *MACs ratio* = MACs_unpruned / MACs_variant (``graphsel.cost``: the theoretical
FLOPs reduction), *realised* = speed-up / MACs ratio. Goal (issue 3): realised ≥ 0.8 with
``round_to``.

Threads: ``--threads`` (default: torch's default, all cores) for torch and onnxruntime alike.

Run: ``python -m benchmarks.prune_latency`` (full: about 10–20 min on 2 quiet cores) or ``--quick``
(resnet18 + mobilenet_v2 at 64², batch 1 and 4, 1 round). Writes
``benchmarks/results/prune_latency{,_quick}.{json,md}``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

MODELS = ["resnet50", "densenet121", "mobilenet_v2", "convnext_tiny", "efficientnet_b0"]
QUICK_MODELS = ["resnet18", "mobilenet_v2"]
GOAL_REALISED = 0.8
ROUNDED = ("graphsel r8", "TP r8")


def build_variants(name: str, example: tuple, args) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    """The four variants of ``name`` and, per variant, how it was made (or why it failed)."""
    torch.manual_seed(0)
    base = common.build_model(name)
    variants: dict[str, torch.nn.Module] = {"unpruned": base}
    info: dict[str, Any] = {"unpruned": {}}
    for label, round_to in (("graphsel r8", args.round_to), ("graphsel", None)):
        try:
            gm = common.graphsel_prune(base, example, ratio=args.ratio, round_to=round_to, verify=args.verify)
            variants[label] = gm.eval()
            info[label] = {"verified": args.verify}
        except Exception as e:  # noqa: BLE001
            info[label] = {"error": common.error_record(e, frames=12)}
    torch.manual_seed(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = common.torch_pruning_prune(common.build_model(name), example, ratio=args.ratio,
                                             round_to=args.round_to)
        variants["TP r8"] = res["model"].eval()
        info["TP r8"] = {}
    except Exception as e:  # noqa: BLE001
        info["TP r8"] = {"error": common.error_record(e)}
    for label, m in variants.items():
        c = common_cost(m, example)
        info[label].update(params=c[0], macs=c[1])
    return variants, info


def common_cost(model, example) -> tuple[int, int | None]:
    import graphsel
    try:
        c = graphsel.cost(model, example)
        return c.params, c.macs
    except Exception:  # noqa: BLE001
        return common.count_params(model), None


def export_onnx(model: torch.nn.Module, size: int, path: Path) -> str:
    """Export with a dynamic batch dimension: the dynamo exporter, else the legacy one. Returns which."""
    x = torch.randn(2, 3, size, size)
    quiet = contextlib.redirect_stdout(io.StringIO())
    try:
        with quiet, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
        return "dynamo"
    except Exception as e:  # noqa: BLE001
        dynamo_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    with quiet, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return f"legacy (dynamo failed: {dynamo_error[:200]})"


def ort_session(path: Path, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_model(name: str, args, threads: int, tmp: Path) -> dict[str, Any]:
    torch.manual_seed(1)
    example = (torch.randn(1, 3, args.size, args.size),)
    variants, info = build_variants(name, example, args)
    sessions = {}
    for label, m in variants.items():
        path = tmp / f"{name}_{label.replace(' ', '_')}.onnx"
        try:
            info[label]["exporter"] = export_onnx(m, args.size, path)
            sessions[label] = ort_session(path, threads)
        except Exception as e:  # noqa: BLE001
            info[label]["onnx_error"] = common.error_record(e)
    rec: dict[str, Any] = {"model": name, "variants": info, "runs": []}
    base_macs = info["unpruned"]["macs"]
    for batch in args.batches:
        torch.manual_seed(2)
        x = torch.randn(batch, 3, args.size, args.size)
        xn = x.numpy()
        with torch.inference_mode():
            ref = {k: m(x) for k, m in variants.items()}
        for k, s in sessions.items():       # the exported model computes what the eager one does
            out = s.run(None, {s.get_inputs()[0].name: xn})[0]
            info[k].setdefault("onnx_max_abs_vs_eager", {})[str(batch)] = float(np.abs(out - ref[k].numpy()).max())
        repeats = args.repeats_b1 if batch == 1 else args.repeats
        for backend in ("eager", "onnxruntime"):
            if backend == "eager":
                cands = {k: (lambda m=m: m(x)) for k, m in variants.items()}
                with torch.inference_mode():
                    t = common.measure(cands, repeats, warmup=args.warmup)
            else:
                cands = {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: xn})) for k, s in sessions.items()}
                t = common.measure(cands, repeats, warmup=args.warmup)
            base = t.get("unpruned")
            for k, tk in t.items():
                row = {"batch": batch, "backend": backend, "variant": k, **tk}
                macs = info[k].get("macs")
                if base and macs and base_macs:
                    row["speedup"] = base["min_ms"] / tk["min_ms"]
                    row["speedup_median"] = base["median_ms"] / tk["median_ms"]
                    row["macs_ratio"] = base_macs / macs
                    row["realised"] = row["speedup"] / row["macs_ratio"]
                rec["runs"].append(row)
            print(f"    batch {batch:>2} {backend:<11} " + "  ".join(
                f"{k} {tk['min_ms']:.1f} ms" for k, tk in t.items()), flush=True)
    del variants, sessions
    gc.collect()
    return rec


def markdown(results: dict) -> str:
    cfg, env = results["config"], results["environment"]
    lines = [f"# Slim-model CPU latency at a {cfg['ratio']:.0%} channel ratio: graphsel vs Torch-Pruning"
             f"{' (quick smoke run)' if cfg['quick'] else ''}", "",
             f"{cfg['size']}² input; {cfg['threads']} thread(s) for torch and onnxruntime; minimum over "
             f"{cfg['repeats_b1']} (batch 1) / {cfg['repeats']} (other batches) alternating rounds after "
             f"{cfg['warmup']} warm-up call(s) (medians in the JSON). *speed-up* = t_unpruned / t_variant; "
             "*MACs ratio* = MACs_unpruned / MACs_variant (`graphsel.cost`), measured in the same run; "
             f"*realised* = speed-up / MACs ratio (goal ≥ {GOAL_REALISED} with round_to: ✅/❌). "
             f"Variants: graphsel `prune(ratio={cfg['ratio']}, l1, uniform, round_to={cfg['round_to']})` → "
             "`fold_masks` → `materialize` (r8), the same without round_to, and Torch-Pruning's standard recipe with "
             f"`round_to={cfg['round_to']}` (TP r8). onnxruntime {env['onnxruntime']} (CPU provider, ORT_ENABLE_ALL).",
             "", common.environment_line(env), ""]
    for r in results["models"]:
        v = r["variants"]
        exporters = {k: x.get("exporter", "export failed") for k, x in v.items()}
        lines += [f"## {r['model']}", "",
                  "Params / MACs (batch 1): " + "; ".join(
                      f"{k} {common.human(x.get('params'))} / {common.human(x.get('macs'))}" for k, x in v.items()
                      if "macs" in x) + ".",
                  "ONNX exporter: " + "; ".join(f"{k}: {e}" for k, e in exporters.items()) + ".", ""]
        errs = {k: x.get("error") or x.get("onnx_error") for k, x in v.items() if x.get("error") or x.get("onnx_error")}
        for k, e in errs.items():
            lines += [f"* {k} failed: {common.short_error(e, 300)}"]
        if errs:
            lines.append("")
        rows = []
        for x in r["runs"]:
            mark = ""
            if x["variant"] in ROUNDED and "realised" in x:
                mark = " ✅" if x["realised"] >= GOAL_REALISED else " ❌"
            rows.append([x["backend"], x["batch"], x["variant"], f"{x['min_ms']:.2f}",
                         f"×{x['speedup']:.2f}" if "speedup" in x else "—",
                         f"×{x['macs_ratio']:.2f}" if "macs_ratio" in x else "—",
                         (f"{x['realised']:.2f}" + mark) if "realised" in x else "—"])
        lines.append(common.table(rows, ["backend", "batch", "variant", "ms", "speed-up", "MACs ratio", "realised"]))
        lines.append("")
    summary = [[r["model"], x["backend"], x["batch"], x["variant"], f"{x['realised']:.2f}"]
               for r in results["models"] for x in r["runs"] if x["variant"] in ROUNDED and "realised" in x]
    if summary:
        met = sum(float(s[-1]) >= GOAL_REALISED for s in summary)
        lines += ["## Goal check (round_to variants)", "",
                  f"{met}/{len(summary)} measurements reach realised ≥ {GOAL_REALISED}.", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: resnet18 + mobilenet_v2, 64², batch 1 and 4")
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--repeats-b1", type=int, default=30, help="alternating rounds at batch 1")
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds at larger batches")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: torch's)")
    ap.add_argument("--verify", action="store_true", help="verify graphsel's passes while pruning (slower)")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.batches, args.repeats_b1, args.repeats, args.warmup = 64, [1, 4], 1, 1, 1
    threads = common.set_threads(args.threads)
    names = args.models or (QUICK_MODELS if args.quick else MODELS)
    results = {"config": {"ratio": args.ratio, "round_to": args.round_to, "size": args.size, "batches": args.batches,
                          "repeats_b1": args.repeats_b1, "repeats": args.repeats, "warmup": args.warmup,
                          "threads": threads, "quick": args.quick, "models": names},
               "environment": common.environment(), "models": []}
    with tempfile.TemporaryDirectory(prefix="graphsel-latency-") as tmp:
        for i, name in enumerate(names, 1):
            print(f"[{i}/{len(names)}] {name}", flush=True)
            results["models"].append(run_model(name, args, threads, Path(tmp)))
            common.write_results("prune_latency", results, markdown(results), args.out, args.quick)
    js, md = common.write_results("prune_latency", results, markdown(results), args.out, args.quick)
    print(f"wrote {js} and {md}")
    return results


if __name__ == "__main__":
    main()
