"""graphsel's compile speed at two commits, side by side in one run: the redesign check (issue 12:
the core after the operator-table redesign must be no slower than the commit before it).

For each commit a git worktree is made (``git worktree add``, removed afterwards) and timing
workers run in subprocesses that import that tree's graphsel (``graphsel.passes`` included), in
alternating order: baseline, current, baseline, current, ... (``--rounds`` each), so that machine
noise hits both alike. Every worker times, per model (random init, eval, batch 1):

* ``prune``: trace → prune(50 %, L1, uniform) → fold_masks → materialize with ``verify=False`` —
  the figure ``benchmarks/prune_speed`` compares with Torch-Pruning — and with ``verify=True``;
* ``trace``: ``graphsel.trace``; ``fuse_bn``: ``transform(["fuse_bn"])`` with verification —
  the figures of ``benchmarks/core_timings``.

Each worker reports the median of ``--repeats`` runs per measurement; the table shows, per commit,
the median over rounds and the ratio current / baseline (< 1: the current commit is faster).
The same API is called at both commits, so only the implementation differs.

Run: ``python -m benchmarks.compare_commits --baseline c5f22cb`` (default: the commit before the
redesign; about 15 min on 2 cores) or ``--quick``. Writes ``benchmarks/results/compare_commits{,_quick}.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

MODELS = ["resnet50", "resnet152", "densenet201", "convnext_base", "efficientnet_b4", "regnet_y_16gf",
          "mobilenet_v3_large", "vit_b_16"]
QUICK_MODELS = ["resnet18", "mobilenet_v3_small"]
BASELINE = "c5f22cb"     # "Layout: the core in layers ..." — the last commit before the operator table

# Runs inside a worker: import graphsel from TREE (its passes/ folder as graphsel.passes, as the
# editable install maps it), time every model, print one JSON line.
WORKER = r'''
import importlib.abc, importlib.util, json, statistics, sys, time, warnings
tree, models, size, repeats = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
class PassesFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "graphsel.passes":
            return importlib.util.spec_from_file_location(name, tree + "/passes/__init__.py",
                                                          submodule_search_locations=[tree + "/passes"])
        return None
sys.meta_path.insert(0, PassesFinder())
sys.path.insert(0, tree)
warnings.simplefilter("ignore")
import torch, torchvision, graphsel
assert graphsel.__file__.startswith(tree), graphsel.__file__
torch.manual_seed(0)
passes = [("prune", {"ratio": 0.5, "criterion": "l1", "scope": "uniform"}), "fold_masks", "materialize"]
def med(fn, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)
out = {}
for name in models:
    model = torchvision.models.get_model(name, weights=None).eval()
    x = (torch.randn(1, 3, size, size),)
    graphsel.transform(model, passes, x, verify=False)        # warm-up (imports, caches)
    out[name] = {
        "prune": med(lambda: graphsel.transform(model, passes, x, verify=False), repeats),
        "prune_verified": med(lambda: graphsel.transform(model, passes, x, verify=True), 1),
        "trace": med(lambda: graphsel.trace(model, x), repeats),
        "fuse_bn": med(lambda: graphsel.transform(model, ["fuse_bn"], x), 1),
    }
print("RESULT " + json.dumps(out))
'''


def run_worker(python: str, tree: Path, models: list[str], size: int, repeats: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, "-c", WORKER, str(tree), ",".join(models), str(size), str(repeats)],
                          capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=3600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"worker for {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default=BASELINE, help="commit to compare against")
    ap.add_argument("--current", default="HEAD", help="commit to compare (default HEAD)")
    ap.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_MODELS)} at 64², 1 round, 1 repeat")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=None, help="instead of the default list (a re-check of a few)")
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    args = ap.parse_args(argv)
    models = args.models or (QUICK_MODELS if args.quick else MODELS)
    rounds, repeats, size = (1, 1, 64) if args.quick else (args.rounds, args.repeats, args.size)
    trees: dict[str, Path] = {}
    tmp = Path(tempfile.mkdtemp(prefix="graphsel-commits-"))
    shas = {}
    try:
        for label, rev in (("baseline", args.baseline), ("current", args.current)):
            shas[label] = subprocess.check_output(["git", "rev-parse", "--short", rev], cwd=common.ROOT, text=True).strip()
            trees[label] = tmp / label
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(trees[label]), rev], cwd=common.ROOT,
                           check=True)
        samples: dict[str, list[dict]] = {"baseline": [], "current": []}
        for r in range(rounds):
            for label in ("baseline", "current"):
                print(f"round {r + 1}/{rounds}: {label} ({shas[label]})", flush=True)
                samples[label].append(run_worker(sys.executable, trees[label], models, size, repeats, args.threads))
    finally:
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=common.ROOT, check=False)
    rows = []
    for name in models:
        for what in ("prune", "prune_verified", "trace", "fuse_bn"):
            base = statistics.median(s[name][what] for s in samples["baseline"])
            cur = statistics.median(s[name][what] for s in samples["current"])
            rows.append({"model": name, "measure": what, "baseline_s": base, "current_s": cur, "ratio": cur / base})
    result = {"environment": common.environment(), "baseline": shas["baseline"], "current": shas["current"],
              "models": models, "size": size, "rounds": rounds, "repeats": repeats, "threads": args.threads,
              "rows": rows, "samples": samples}
    stem = "compare_commits_quick" if args.quick else "compare_commits"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Compile speed: {shas['current']} against {shas['baseline']}", "",
             common.environment_line(result["environment"]), "",
             f"{rounds} alternating rounds per commit, each the median of {repeats} runs ({size}², batch 1, "
             f"{args.threads} thread); ratio = current / baseline (< 1: faster now).", "",
             "| model | measure | baseline s | current s | ratio |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['measure']} | {row['baseline_s']:.3f} | {row['current_s']:.3f} | "
                     f"×{row['ratio']:.2f} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
