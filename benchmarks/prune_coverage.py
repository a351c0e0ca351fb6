"""Coverage: torchvision's classification models pruned at 50 % by graphsel and by Torch-Pruning.

For every model of ``torchvision.models.list_models(module=torchvision.models)`` (80 in
torchvision 0.29; random initialisation, eval mode, nothing downloaded), in one process:

* **graphsel**: ``transform(model, [prune(ratio=0.5, round_to=8, criterion="l1", scope="uniform"),
  fold_masks, materialize], (x,), verify=True)``. A model counts as done only when every pass
  verifies — ``materialize`` is checked against the mask oracle of the masked graph on the example
  input and random inputs. Also recorded: the channel analysis' prunable fraction of conv/linear
  output channels (the classifier's outputs, frozen as the model output, left out) and, for
  partly frozen models, the most frequent frozen reason;
* **Torch-Pruning** (same model, same weights, same input): its standard torchvision recipe
  (``BasePruner``, ``MagnitudeImportance(p=1)``, ``pruning_ratio=0.5`` per layer, the final
  classifier ignored, ``num_heads`` for attention, ViT's ``hidden_dim`` patched). A model counts as
  done when its forward runs after pruning — Torch-Pruning has no reference to check the pruned
  output against.

Params and MACs are counted by ``graphsel.cost`` for both tools (torchvision's convention; the
Torch-Pruning model falls back to ``tp.utils.count_ops_and_params`` when it cannot be traced).
Inputs are small where the model allows (``--size``, default 64²); ViT, Swin and MaxViT get 224²
(position embeddings / window partitions), inception_v3 96² (its minimum is 75²).

Each tool gets a time limit (``--timeout``, 600 s) and a memory budget per model (``--memory-gb``;
default 8× the model's bytes, at least 4 GiB, at most 85 % of the available memory): Torch-Pruning's
index mapping grows without bound on Swin and MaxViT, and without the budget the kernel's OOM killer
ends the whole sweep; with it the model is recorded as a ``MemoryError`` failure.

Run: ``python -m benchmarks.prune_coverage`` (full sweep, roughly 1–1.5 h on 2 quiet cores; needs
~12 GB free RAM for regnet_y_128gf and vit_h_14) or ``--quick`` (3 small models). ``--models a b``
runs a subset. Writes ``benchmarks/results/prune_coverage{,_quick}.{json,md}``, the JSON after every
model (an interrupted sweep keeps what was done).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

QUICK_MODELS = ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5"]


# -- graphsel's channel analysis -----------------------------------------------------------

def frozen_summary(model: torch.nn.Module, example: tuple) -> dict[str, Any]:
    """Prunable fraction of conv/linear output channels, leaving out channels frozen only because
    they are the model output (the classifier), and the most frequent other frozen reasons."""
    import graphsel
    from graphsel.analysis.channels import analyze_channels

    gm = graphsel.trace(model, example)
    a = analyze_channels(gm)
    frozen_classes = set(a.class_frozen)
    output_only = {c for c, rs in a.class_frozen.items() if all(r == "model output" for r in rs)}
    total = prunable = output = 0
    reasons: Counter[str] = Counter()
    for name, (start, count) in a.sources.items():
        if name not in a.source_module:
            continue                                   # model inputs
        labels = a.labels[start:start + count]
        total += count
        frozen = np.isin(labels, list(frozen_classes)) if frozen_classes else np.zeros(count, bool)
        out = np.isin(labels, list(output_only)) if output_only else np.zeros(count, bool)
        prunable += int((~frozen).sum())
        output += int(out.sum())
        for c in labels[frozen & ~out].tolist():
            reasons[a.class_frozen[c][0]] += 1
    considered = total - output
    report = [r for r in a.frozen_report() if not r.endswith(": model output")]
    return {
        "summary": a.summary(),
        "channels": total, "classifier_channels": output, "prunable_channels": prunable,
        "prunable_fraction": prunable / considered if considered else 0.0,
        "partly_frozen": prunable < considered,
        "top_frozen_reason": reasons.most_common(1)[0][0] if reasons else None,
        "frozen_channels_by_reason": dict(reasons.most_common(5)),
        "frozen_report": report[:5],
    }


def cost_pair(model, example) -> tuple[int | None, int | None, str]:
    import graphsel
    try:
        c = graphsel.cost(model, example)
        return c.params, c.macs, "graphsel.cost"
    except Exception:  # noqa: BLE001 - fall back to Torch-Pruning's counter
        try:
            import torch_pruning as tp
            macs, params = tp.utils.count_ops_and_params(model, example[0])
            return int(params), int(macs), "tp.utils.count_ops_and_params"
        except Exception:  # noqa: BLE001
            return common.count_params(model), None, "parameter count only"


# -- one model -----------------------------------------------------------------------------

def memory_budget(args, model: torch.nn.Module) -> float | None:
    """Bytes a tool may add while handling ``model``: ``--memory-gb`` when given, else 8× the model's
    parameter and buffer bytes (a few copies of the model plus activations), at least 4 GiB; never more
    than 85 % of the memory available at that moment."""
    if args.memory_gb:
        want = args.memory_gb * 2**30
    else:
        size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        want = max(4 * 2**30, 8 * size)
    avail = common.available_memory()
    return min(want, 0.85 * avail) if avail else want


@contextlib.contextmanager
def guarded(args, model: torch.nn.Module):
    """Time and memory limits for one tool on one model."""
    budget = memory_budget(args, model)
    with common.time_limit(args.timeout), common.memory_limit(budget):
        try:
            yield
        except MemoryError as e:
            raise MemoryError(f"needed more than its memory budget of {budget / 2**30:.1f} GiB "
                              f"(--memory-gb){': ' + str(e) if str(e) else ''}") from e


def run_graphsel(name: str, example: tuple, args) -> dict[str, Any]:
    import graphsel
    rec: dict[str, Any] = {}
    torch.manual_seed(0)
    model = common.build_model(name)
    rec["params_before"], rec["macs_before"], _ = cost_pair(model, example)
    try:
        with guarded(args, model):
            rec["analysis"] = frozen_summary(model, example)
    except Exception as e:  # noqa: BLE001
        rec["analysis_error"] = common.error_record(e)
    t0 = time.perf_counter()
    try:
        with guarded(args, model):
            gm = common.graphsel_prune(model, example, ratio=args.ratio, round_to=args.round_to,
                                       scope=args.scope, verify=True)
        rec["seconds"] = time.perf_counter() - t0
        rec["times"] = common.graphsel_times(gm, rec["seconds"])
        with torch.no_grad():
            gm(*example)
        rec["params_after"], rec["macs_after"], _ = cost_pair(gm, example)
        hist = {h.name: h for h in graphsel.graphsel_meta(gm).history}
        m = hist.get("materialize")
        rec["max_abs_deviation"] = m.max_abs if m else None
        rec["tolerance"] = m.tolerance if m else None
        rec["ok"] = True
        del gm
    except Exception as e:  # noqa: BLE001
        rec["seconds"] = time.perf_counter() - t0
        rec["ok"] = False
        rec["error"] = common.error_record(e, frames=12)
    del model
    return rec


def run_torch_pruning(name: str, example: tuple, args) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    torch.manual_seed(0)
    model = common.build_model(name)
    t0 = time.perf_counter()
    try:
        with guarded(args, model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = common.torch_pruning_prune(model, example, ratio=args.ratio)
            rec["build_s"], rec["prune_s"] = res["build_s"], res["prune_s"]
            model = res["model"].eval()
            with torch.no_grad():
                model(*example)
        rec["seconds"] = time.perf_counter() - t0
        rec["ok"] = True
        rec["params_after"], rec["macs_after"], rec["counter"] = cost_pair(model, example)
    except Exception as e:  # noqa: BLE001
        rec["seconds"] = time.perf_counter() - t0
        rec["ok"] = False
        rec["error"] = common.error_record(e)
    del model
    return rec


# -- report --------------------------------------------------------------------------------

def _arrow(before, after) -> str:
    if after is None:
        return common.human(before)
    return f"{common.human(before)} → {common.human(after)}"


def markdown(results: dict) -> str:
    cfg, env = results["config"], results["environment"]
    rows, n = results["models"], len(results["models"])
    gs_ok = sum(r["graphsel"]["ok"] for r in rows)
    tp_ok = sum(r["torch_pruning"]["ok"] for r in rows)
    partly = [r["model"] for r in rows if r["graphsel"].get("analysis", {}).get("partly_frozen")]
    sizes = Counter(f"{r['input']}²" for r in rows)
    lines = [
        f"# Pruning coverage: torchvision classification models at {cfg['ratio']:.0%}"
        f"{' (quick smoke run)' if cfg['quick'] else ''}", "",
        f"**graphsel: {gs_ok}/{n} pruned and verified against the mask oracle; "
        f"Torch-Pruning: {tp_ok}/{n} pruned with a forward that runs.**", "",
        "* graphsel counts a model as done only if `graphsel.transform(model, [prune, fold_masks, materialize], "
        "(x,), verify=True)` succeeds: every pass is checked, and `materialize` (the slim model) must match the "
        "mask oracle of the masked graph on the example input and random inputs. "
        f"Prune options: ratio {cfg['ratio']}, criterion l1, scope {cfg['scope']}, round_to {cfg['round_to']}.",
        "* Torch-Pruning counts a model as done when **its forward runs after pruning**: it has no reference to "
        "check the pruned output against (whether it equals a masked equivalent is not checkable). Recipe: "
        "`BasePruner` + `MagnitudeImportance(p=1)`, `pruning_ratio` " f"{cfg['ratio']}" " per layer, final "
        "classifier ignored, `num_heads` for `nn.MultiheadAttention`, ViT `hidden_dim` patched after pruning.",
        "* Same process, same random weights, same input for both. Input sizes (N=1, 3 channels): "
        + ", ".join(f"{s}: {k} model(s)" for s, k in sorted(sizes.items()))
        + " — small where the model allows; 224² for ViT/Swin/MaxViT (fixed-size position embeddings and "
        "windows), 96² for inception_v3.",
        "* Params/MACs by `graphsel.cost` for both tools (torchvision's MAC convention). *prunable*: the share of "
        "conv/linear output channels graphsel may remove (the classifier's outputs left out); ⚠ marks models "
        f"graphsel leaves partly frozen ({len(partly)}), with the most frequent frozen reason.",
        f"* {common.environment_line(env)}", "",
    ]
    table = []
    for r in rows:
        g, t = r["graphsel"], r["torch_pruning"]
        an = g.get("analysis")
        if an:
            prun = f"{an['prunable_fraction']:.0%}"
            if an["partly_frozen"]:
                prun = f"⚠ {prun}: {an['top_frozen_reason']}"
        else:
            prun = "analysis failed: " + common.short_error(g.get("analysis_error"), 80)
        table.append([
            r["model"], f"{r['input']}²",
            "✅ verified" if g["ok"] else "❌ " + common.short_error(g.get("error"), 100),
            _arrow(g.get("params_before"), g.get("params_after")),
            _arrow(g.get("macs_before"), g.get("macs_after")),
            prun,
            "✅ forward runs" if t["ok"] else "❌ " + common.short_error(t.get("error"), 80),
            common.human(t.get("params_after")), common.human(t.get("macs_after")),
            f"{g['seconds']:.1f}", f"{t['seconds']:.1f}",
        ])
    lines.append(common.table(table, ["model", "input", "graphsel", "params before → after",
                                      "MACs before → after", "prunable (top frozen reason)", "Torch-Pruning",
                                      "TP params after", "TP MACs after", "graphsel s (verify on)", "TP s"]))
    failed = [r for r in rows if not r["graphsel"]["ok"]]
    if failed:
        lines += ["", "## graphsel failures (full errors)", ""]
        for r in failed:
            e = r["graphsel"]["error"]
            lines += [f"### {r['model']}", "", "```", f"{e['type']}: {e['message']}", "```", ""]
    tp_failed = [r for r in rows if not r["torch_pruning"]["ok"]]
    if tp_failed:
        lines += ["", "## Torch-Pruning failures", ""]
        lines += [f"* {r['model']}: {common.short_error(r['torch_pruning']['error'], 300)}" for r in tp_failed]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"smoke test: {', '.join(QUICK_MODELS)}")
    ap.add_argument("--models", nargs="+", help="a subset of the zoo (default: all classification models)")
    ap.add_argument("--size", type=int, default=64, help="input side where the model allows a small input")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--scope", default="uniform", choices=["uniform", "global"],
                    help="graphsel's ranking scope (uniform = Torch-Pruning's per-layer ratio)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per model and tool before giving up")
    ap.add_argument("--memory-gb", type=float, default=None,
                    help="memory a tool may add per model (default: 8x the model's bytes, at least 4 GiB, at most 85%% "
                         "of what is available at that moment); "
                         "past it the tool fails with MemoryError instead of the OOM killer ending the sweep")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    common.set_threads(args.threads)
    names = args.models or (QUICK_MODELS if args.quick else common.classification_models())
    unknown = set(names) - set(common.classification_models())
    if unknown:
        ap.error(f"not torchvision classification models: {', '.join(sorted(unknown))}")
    results = {"config": {"ratio": args.ratio, "round_to": args.round_to, "scope": args.scope, "size": args.size,
                          "timeout_s": args.timeout, "memory_gb": args.memory_gb, "quick": args.quick, "models": names},
               "environment": common.environment(), "models": []}
    for i, name in enumerate(names, 1):
        side = common.input_size(name, args.size)
        torch.manual_seed(1)
        example = (torch.randn(1, 3, side, side),)
        print(f"[{i}/{len(names)}] {name} ({side}²)", flush=True)
        row = {"model": name, "input": side}
        row["graphsel"] = run_graphsel(name, example, args)
        gc.collect()
        row["torch_pruning"] = run_torch_pruning(name, example, args)
        gc.collect()
        results["models"].append(row)
        g, t = row["graphsel"], row["torch_pruning"]
        print(f"    graphsel {'ok' if g['ok'] else 'FAIL ' + common.short_error(g.get('error'))} "
              f"({g['seconds']:.1f} s); Torch-Pruning {'ok' if t['ok'] else 'FAIL ' + common.short_error(t.get('error'))}"
              f" ({t['seconds']:.1f} s)", flush=True)
        common.write_results("prune_coverage", results, markdown(results), args.out, args.quick)
    n = len(results["models"])
    results["totals"] = {"models": n, "graphsel_verified": sum(r["graphsel"]["ok"] for r in results["models"]),
                         "torch_pruning_forward_runs": sum(r["torch_pruning"]["ok"] for r in results["models"])}
    js, md = common.write_results("prune_coverage", results, markdown(results), args.out, args.quick)
    print(f"graphsel {results['totals']['graphsel_verified']}/{n} verified; Torch-Pruning "
          f"{results['totals']['torch_pruning_forward_runs']}/{n} ran. Wrote {js} and {md}")
    return results


if __name__ == "__main__":
    main()
