"""Run every benchmark script in ``benchmarks/`` with its full settings (``make bench``).

Every ``benchmarks/*.py`` except this file, ``common.py``, ``train.py`` (shared helpers) and ``__init__.py`` is a benchmark
(the channel compiler's ``prune_*``, dynamic group convolution's ``dgc_*``, selective
convolution's ``sconv_*``, the core's ``core_timings``, and any added later). Each runs as
``python -m benchmarks.<name>`` in its own process from the repository root, one after another
(timings must not overlap), and writes its JSON + Markdown to ``benchmarks/results/``. A failing
script does not stop the others; the exit status is non-zero when any failed.

Run: ``python -m benchmarks.run_all`` (full: most of a day on 2 cores — the method benchmarks about
an hour each, the third-party zoo sweep about three hours; run it on a quiet machine),
``--quick`` (passes ``--quick`` to every script: smoke tests), ``--only prune_speed dgc_latency``
or ``--skip prune_coverage``, ``--list`` to see the scripts.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NOT_BENCHMARKS = {"__init__", "common", "run_all", "train"}
# Cheap, foundational measurements first; the long zoo sweep last.
FIRST = ("core_timings",)
LAST = ("prune_coverage", "zoo_sweep")


def scripts() -> list[str]:
    """Benchmark module names in run order."""
    names = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NOT_BENCHMARKS and not p.stem.startswith("_"))
    return ([n for n in FIRST if n in names] + [n for n in names if n not in FIRST + LAST]
            + [n for n in LAST if n in names])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every script (smoke tests)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these scripts")
    ap.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="do not run these scripts")
    ap.add_argument("--list", action="store_true", help="list the scripts and exit")
    args = ap.parse_args(argv)
    names = scripts()
    if args.list:
        print("\n".join(names))
        return 0
    unknown = (set(args.only or []) | set(args.skip)) - set(names)
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; available: {', '.join(names)}")
    if args.only:
        names = [n for n in names if n in args.only]
    names = [n for n in names if n not in args.skip]
    outcome: list[tuple[str, int, float]] = []
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if args.quick else [])
        print(f"=== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        outcome.append((name, rc, time.perf_counter() - t0))
        print(f"=== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {outcome[-1][2]:.0f} s", flush=True)
    print("\nSummary:")
    for name, rc, secs in outcome:
        print(f"  {name:<24} {'ok' if rc == 0 else f'FAILED (exit {rc})':<18} {secs:8.0f} s")
    print(f"Results in {HERE / 'results'}")
    return 0 if all(rc == 0 for _, rc, _ in outcome) else 1


if __name__ == "__main__":
    sys.exit(main())
