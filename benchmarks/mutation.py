"""Mutation score: does the test suite catch deliberately broken copies of graphsel?

A curated set of meaningful mutants — each one edit that a plausible bug would make (a wrong
slice, an off-by-one in a split, a dropped mask, a skipped verification, a sign error in ECDM,
a wrong threshold percentile, pruning the *most* important channels, ...) — is applied, one at a
time, to a copy of the committed tree (a ``git worktree`` of HEAD: uncommitted edits are left out, so the
score is the commit's), and
the tests that exercise the mutated code run against it (``pytest -x``, the selection listed with
each mutant, all of it part of ``make test``). A mutant is **killed** when a test fails, **survives**
otherwise; every survivor is listed, with the reason it is equivalent where it is. Each mutant is
also checked to apply (its text must occur exactly once), so the list cannot rot silently.

A test selection that kills a mutant proves ``make test`` kills it (the selection is part of it).

Run: ``python -m benchmarks.mutation`` (about 40 minutes on 2 cores), ``--only NAME ...``, or
``--quick`` (the first 3 mutants). Writes ``benchmarks/results/mutation{,_quick}.json``
(``{mutants, killed, survived: [...], results: [...]}``) and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str                 # path in the repository
    old: str                  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]    # pytest selection (files or node ids) run against the mutant
    what: str                 # the bug it stands for
    equivalent: str = ""      # why a survivor cannot be told apart (empty: it must be killed)


M = Mutant
MAT = ("tests/test_materialize.py",)
CH = ("tests/test_channels.py", "tests/test_materialize.py")
MUTANTS: list[Mutant] = [
    # -- prune: which channels go ----------------------------------------------------------------
    M("prune_keeps_the_least_important", "passes/prune.py",
      "out[g.index] = cls[order[:n_remove]].tolist()", "out[g.index] = cls[order[::-1][:n_remove]].tolist()",
      ("tests/test_prune_choice.py", *MAT), "prune removes the highest-scoring classes instead of the lowest"),
    M("prune_l1_ignores_normalisation", "passes/prune.py",
      "norms = norms / (norms.mean() + 1e-12)", "norms = -norms",
      ("tests/test_prune_choice.py",), "L1 scores negated: the smallest filters look most important"),
    M("prune_bn_gamma_reads_beta", "passes/prune.py",
      "gam = m.weight.detach().abs().double().numpy()", "gam = m.bias.detach().abs().double().numpy()",
      ("tests/test_prune_choice.py",), "BN-γ criterion reads β"),
    M("prune_round_to_ignored", "passes/prune.py",
      "if round_to and round_to > 1 and size > round_to:", "if False:",
      ("tests/test_materialize.py::test_prune_round_to_keeps_multiples",), "round_to has no effect"),
    M("prune_target_macs_inverted", "passes/prune.py", "if m <= target:", "if m >= target:",
      ("tests/test_materialize.py::test_prune_target_macs_reaches_the_target",), "bisection on MACs goes the wrong way"),
    M("prune_ecdm_ignores_relu", "passes/prune.py",
      "return relu_gaussian_mean(beta, gamma) if relu else beta.double()", "return beta.double()",
      ("tests/test_prune_choice.py",), "group ECDM forgets the ReLU in its expected input"),
    # -- masks and liveness --------------------------------------------------------------------------
    M("group_mask_records_one_position", "graphsel/analysis/masks.py",
      'get_masks(gm).removed.setdefault(source, set()).update(_positions(removed, f"group mask on \'{source}\'"))',
      'get_masks(gm).removed.setdefault(source, set()).update(sorted(_positions(removed, f"group mask on \'{source}\'"))[:1])',
      MAT, "add_group_mask keeps only the first position of each call (the issue's example)"),
    M("frozen_classes_maskable", "graphsel/analysis/masks.py", "        if len(hit):\n            p, c =",
      "        if False:\n            p, c =", MAT, "masks on frozen channels are accepted"),
    M("liveness_ignores_other_readers", "graphsel/analysis/masks.py",
      "return {c for c in masked - alive - resolved.removed_classes if c not in a.class_frozen}",
      "return {c for c in masked - resolved.removed_classes if c not in a.class_frozen}",
      MAT, "fold_masks removes channels other readers still need"),
    M("vanishing_tensors_never_found", "graphsel/analysis/masks.py",
      "    if not removed:\n        return []\n    gone = a.class_lookup(removed)\n    found",
      "    if True:\n        return []\n    gone = a.class_lookup(removed)\n    found",
      MAT, "masks emptying a split piece are not caught"),
    # -- channel analysis ----------------------------------------------------------------------------
    M("add_does_not_couple", "graphsel/ops/channel.py", "        cx.a.union(ids, o.ids)\n", "",
      CH, "element-wise ops stop unioning the operands' channels (residual adds decouple)"),
    M("grouped_conv_does_not_couple", "graphsel/ops/conv.py", "        for k in range(1, g):\n            cx.a.union(blocks[0], blocks[k])\n            mixed",
      "        for k in range(1, 1):\n            cx.a.union(blocks[0], blocks[k])\n            mixed",
      CH, "grouped convs stop coupling the same position of every group"),
    M("depthwise_as_consumer", "graphsel/ops/conv.py", "if g > 1 and g == m.in_channels == m.out_channels:",
      "if False:", CH, "a depthwise conv becomes a consumer instead of a per-channel op"),
    M("layout_check_skipped", "graphsel/ops/channel.py", "            cx.a.check_layout(node, src[0], result)",
      "            pass", CH, "reshapes that do not commute with removal are not frozen",
      equivalent="the id propagation already unites every channel a reshape mixes, so removal commutes by "
                 "construction: over 600 random reshape/permute/flip chains and 9 hand-written rearrangements "
                 "(pixel (un)shuffle, channel shuffle, roll, NHWC views) the check ran 658 times and never froze "
                 "a class; kept as a guard for rules registered later"),
    M("channel_reduction_not_read", "graphsel/ops/norm.py",
      "    cx.a.readers.append(Reader(node.name, \"reduce\", x.ids, node.target, keeps_channels=True))\n    if m.elementwise_affine:",
      "    if m.elementwise_affine:", CH, "LayerNorm over channels is no longer a channel reduction"),
    M("size_counts_untracked", "graphsel/analysis/channels.py", "        if SizeInt.created == self._sizes_before:",
      "        if True:", CH, "channel counts used as sizes are not followed"),
    # -- slicing ------------------------------------------------------------------------------------
    M("bn_running_mean_shifted", "graphsel/ops/slicing.py", "            _replace_param(new, name, 0, keep)\n        if sizes",
      "            _replace_param(new, name, 0, keep)\n            if name == 'running_mean' and getattr(new, name, None) is not None:\n                new._buffers[name] = new._buffers[name] + 0.5\n        if sizes",
      MAT, "materialize adds 0.5 to every sliced BatchNorm's running_mean (the issue's example)"),
    M("conv_input_slice_reversed", "graphsel/ops/slicing.py", "            w = w.index_select(1, keep_in)",
      "            w = w.index_select(1, keep_in.flip(0))", MAT, "conv input columns kept in the wrong order"),
    M("linear_output_off_by_one", "graphsel/ops/slicing.py", "        w = w.index_select(0, keep_out)\n        if m.bias",
      "        w = w.index_select(0, (keep_out + 1) % m.out_features)\n        if m.bias", MAT,
      "linear output rows shifted by one"),
    M("split_sizes_off_by_one", "graphsel/ops/shape.py",
      "new_sizes = [int(keep[starts[i]:starts[i + 1]].sum()) for i in range(len(sizes))]",
      "new_sizes = [int(keep[starts[i]:starts[i + 1] + 1].sum()) for i in range(len(sizes))]",
      MAT, "split sizes count one channel of the next piece"),
    M("channel_slice_stop_off_by_one", "graphsel/ops/shape.py", "new_stop = new_start + int(keep[start:stop].sum())",
      "new_stop = new_start + int(keep[start:stop].sum()) - 1", MAT, "a channel slice loses its last kept channel"),
    M("view_sizes_not_rewritten", "graphsel/ops/shape.py",
      "    return tuple(s if isinstance(o, int) and o != -1 and o != s else o for o, s in zip(old, new_shape))",
      "    return tuple(old)", MAT, "view/reshape sizes keep the unpruned channel count"),
    M("group_norm_groups_kept", "graphsel/ops/slicing.py", 'return {"num_groups": k // per, "num_channels": k}',
      'return {"num_groups": m.num_groups, "num_channels": k}', MAT, "GroupNorm keeps its group count after slicing"),
    # -- materialize ----------------------------------------------------------------------------------
    M("gather_keeps_wrong_positions", "passes/materialize.py",
      'idx_path = add_module(self.gm, "graphsel_gather", _IndexHolder(torch.from_numpy(keep)))',
      'idx_path = add_module(self.gm, "graphsel_gather", _IndexHolder(torch.from_numpy(keep[::-1].copy())))',
      MAT, "the gather for a partial reader selects the wrong channels"),
    M("partial_columns_not_zeroed", "passes/materialize.py", "                if partial.any():\n                    self._zero_columns",
      "                if False:\n                    self._zero_columns", MAT, "partially unread flatten blocks keep their columns"),
    M("param_slots_not_sliced", "passes/materialize.py", "            elif key[0] == \"param\":\n                self._slice_param(key[1], key[2], idx)",
      "            elif False:\n                self._slice_param(key[1], key[2], idx)", MAT, "layer-scale style parameters are not sliced"),
    # -- pipeline: verification, oracle, copies ------------------------------------------------------------
    M("verification_skipped", "graphsel/pipeline/phases.py", "        if violated:\n            node, detail",
      "        if False:\n            node, detail", ("tests/test_pipeline.py",), "a violated contract is not reported"),
    M("tolerance_too_loose", "graphsel/pipeline/verify.py", "            tol = max(tol, at + rt * s)",
      "            tol = max(tol, at + 1000 * rt * s)", ("tests/test_pipeline.py",), "verification tolerance 1000× too loose"),
    M("oracle_ignores_consumer_masks", "graphsel/pipeline/oracle.py",
      "            consumer[r.node] = (dim, torch.from_numpy(resolved.consumer_keep[r.node]))", "            pass",
      MAT, "the oracle forgets consumer masks"),
    M("oracle_reduces_over_all_channels", "graphsel/pipeline/oracle.py", "        if n.name in plan.reduce:",
      "        if False:", ("tests/test_materialize.py", "tests/test_channels.py"),
      "channel reductions include the removed (zeroed) channels"),
    M("predicted_shapes_unchecked", "graphsel/pipeline/phases.py",
      "        if predicted is not None:\n            _check_predicted_shapes", "        if False:\n            _check_predicted_shapes",
      ("tests/test_pipeline.py",), "a pass's recorded shapes are trusted under verification"),
    M("pass_copy_shares_modules", "graphsel/pipeline/phases.py", "    return copy.deepcopy(gm, memo)", "    return gm",
      ("tests/test_pipeline.py", "tests/test_latency.py"),
      "a pass edits the previous graph instead of a copy (latency-aware pruning materialises trial models on copies)"),
    M("version_not_bumped", "graphsel/pipeline/phases.py", "        recompile(new)\n        step.ctx.invalidate(new)",
      "        recompile(new)", ("tests/test_pipeline.py", *MAT), "a changed graph keeps its cached analyses"),
    # -- tracing and copying ------------------------------------------------------------------------------
    M("training_flags_not_restored", "graphsel/ir/tracing.py", "    _copy_training_flags(model, gm)\n", "",
      ("tests/test_tracing.py",), "the traced module is returned in eval mode whatever the model's mode"),
    M("buffers_shared_with_user", "graphsel/ir/copying.py", "            memo[id(t)] = t.clone()",
      "            memo[id(t)] = t", ("tests/test_tracing.py", "tests/test_copying.py", "tests/test_pipeline.py"),
      "the traced copy shares the user's buffers"),
    # -- cost -----------------------------------------------------------------------------------------------
    M("conv_macs_ignore_groups", "graphsel/ops/costs.py", "    return math.prod(out_shape) * weight_shape[1] * k",
      "    return math.prod(out_shape) * weight_shape[1] * k * groups", ("tests/test_cost.py",),
      "grouped conv MACs multiplied by the groups"),
    M("linear_bias_as_macs", "graphsel/ops/costs.py", '    d = {"macs": math.prod(out) * m.in_features}',
      '    d = {"macs": math.prod(out) * (m.in_features + (m.bias is not None))}', ("tests/test_cost.py",),
      "a linear layer's bias counted as MACs"),
    M("distributed_cost_extra_unit", "graphsel/analysis/cost.py", "            if len(started) == n_units:",
      "            if len(started) == n_units + 1:", ("tests/test_cost.py",), "list scheduling runs n + 1 units"),
    # -- selective convolution -------------------------------------------------------------------------------
    M("ecdm_sign_error", "passes/sconv/ecdm.py", "    out = wsum * e.unsqueeze(0)", "    out = -wsum * e.unsqueeze(0)",
      ("tests/test_selective_conv.py", "tests/test_selective_conv_properties.py"),
      "ECDM with the wrong sign (compensation moves the bias the wrong way)"),
    M("dealloc_may_close_last_slot", "passes/sconv/ecdm.py", "    count = min(count, max(n_open - 1, 0))",
      "    count = min(count, n_open)", ("tests/test_selective_conv.py", "tests/test_selective_conv_properties.py"),
      "dealloc can close a layer's last open slot"),
    M("ecdm_ignores_closed_slots", "passes/sconv/ecdm.py",
      "    e = expected_activation(module.bn) * module.is_open.detach().double()",
      "    e = expected_activation(module.bn)", ("tests/test_selective_conv.py",), "closed slots still count as damage"),
    # -- dynamic group convolution ----------------------------------------------------------------------------
    M("dgc_ramp_ignores_warmup", "passes/dgc/schedule.py", "        k = round(in_channels * ratio * 1.5 * (p - WARMUP_END))",
      "        k = round(in_channels * ratio * 1.5 * p)", ("tests/test_dynamic_group_conv.py",),
      "the k schedule's ramp ignores the warm-up (too many channels pruned during training)"),
    M("dgc_threshold_wrong_percentile", "passes/dgc/threshold.py", "        m = int(round(float(ratio) * v.numel()))",
      "        m = int(round((1 - float(ratio)) * v.numel()))", ("tests/test_dynamic_group_conv.py",),
      "the global threshold takes the (1 − ξ) percentile"),
    M("dgc_final_rate_wrong", "passes/dgc/schedule.py", "        k = round(in_channels * ratio)\n",
      "        k = round(in_channels * ratio) - 1\n", ("tests/test_dynamic_group_conv.py",),
      "the fine-tuning phase prunes one channel fewer than ξ"),
]


def _apply(tree: Path, m: Mutant) -> None:
    path = tree / m.file
    text = path.read_text(encoding="utf-8")
    n = text.count(m.old)
    if n != 1:
        raise RuntimeError(f"mutant {m.name}: its text occurs {n} times in {m.file} (must be exactly once)")
    path.write_text(text.replace(m.old, m.new), encoding="utf-8")


def _copy_tree(dst: Path) -> None:
    """HEAD, with graphsel/passes linked to passes/ (as the editable install maps it), so that tests
    in the copy import the copy."""
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(dst), "HEAD"], cwd=common.ROOT, check=True)
    (dst / "graphsel" / "passes").symlink_to("../passes")


def _run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, str, float]:
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONDONTWRITEBYTECODE="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "2",
                               "-m", "not zoo", *tests], cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return True, "timeout", time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return proc.returncode != 0, (failed[0] if failed else proc.stdout.strip().splitlines()[-1:][0] if proc.stdout.strip() else ""), seconds


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", default=None, help="mutant names")
    ap.add_argument("--quick", action="store_true", help="the first 3 mutants")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", type=Path, default=common.RESULTS)
    ap.add_argument("--update", action="store_true",
                    help="with --only: replace those mutants' results in the existing results file")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only is None or m.name in args.only]
    if args.quick:
        chosen = chosen[:3]
    for m in chosen:        # every mutant applies before anything runs (a long run must not die at mutant 27)
        text = (common.ROOT / m.file).read_text(encoding="utf-8")
        if text.count(m.old) != 1:
            raise RuntimeError(f"mutant {m.name}: its text occurs {text.count(m.old)} times in {m.file} (must be exactly once)")
    tmp = Path(tempfile.mkdtemp(prefix="graphsel-mutants-"))
    base = tmp / "tree"
    results = []
    try:
        _copy_tree(base)
        pristine = {m.file: (base / m.file).read_text(encoding="utf-8") for m in chosen}
        ok, detail, _ = _run_tests(base, tuple(sorted({t.split("::")[0] for m in chosen for t in m.tests})),
                                   args.timeout * 3)
        if ok:
            raise RuntimeError(f"the unmutated tree fails its tests: {detail}")
        for i, m in enumerate(chosen, 1):
            _apply(base, m)
            try:
                killed, detail, seconds = _run_tests(base, m.tests, args.timeout)
            finally:
                (base / m.file).write_text(pristine[m.file], encoding="utf-8")
            results.append({**asdict(m), "killed": killed, "detail": detail, "seconds": round(seconds, 1)})
            print(f"[{i}/{len(chosen)}] {m.name}: {'killed' if killed else 'SURVIVED'} ({seconds:.0f} s) {detail}",
                  flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=common.ROOT, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    stem = "mutation_quick" if args.quick else "mutation"
    if args.update:
        previous = json.loads((args.out / f"{stem}.json").read_text())["results"]
        fresh = {r["name"]: r for r in results}
        known = {m.name: asdict(m) for m in MUTANTS}
        results = [{**r, **known.get(r["name"], {}), **fresh.pop(r["name"], {})} for r in previous] + list(fresh.values())
    survived = [r for r in results if not r["killed"]]
    out = {"environment": common.environment(), "mutants": len(results), "killed": len(results) - len(survived),
           "survived": [{"name": r["name"], "what": r["what"], "equivalent": r["equivalent"]} for r in survived],
           "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# Mutation score: {out['killed']} / {out['mutants']} mutants killed", "",
             common.environment_line(out["environment"]), "",
             "| mutant | file | bug it stands for | result | first failing test |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['file']} | {r['what']} | {'killed' if r['killed'] else '**survived**' + (' (equivalent)' if r['equivalent'] else '')} | "
                     f"{r['detail'].replace('|', '/')[:110]} |")
    if survived:
        lines += ["", "Survivors:", ""] + [f"- **{r['name']}** ({r['what']}): "
                                          + (f"equivalent — {r['equivalent']}" if r["equivalent"] else "not equivalent: a gap in the tests")
                                          for r in survived]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:1]))
    return out


if __name__ == "__main__":
    main()
