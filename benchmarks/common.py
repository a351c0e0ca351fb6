"""Shared helpers for the benchmark scripts: environment record, timing, model zoo, result files.

* :func:`environment` — versions (torch, torchvision, torch-pruning, onnxruntime, graphsel's
  commit), CPU model, core count, thread settings and load average, recorded in every result;
* :func:`set_threads` — one thread setting for torch (intra- and inter-op) and onnxruntime;
* :func:`measure` — latency: alternate the candidates round by round after a warm-up and keep the
  minimum and median (the minimum is robust to other processes on a shared machine);
  :func:`repeat_wall` — wall time of a heavy one-shot job (fresh state per run) over repeats;
* :func:`classification_models`, :func:`build_model`, :func:`input_size` — torchvision's
  classification zoo with random weights (nothing is downloaded) and the input size used for each;
* :func:`time_limit`, :func:`memory_limit` — raise :class:`TimeoutError` after N seconds, or
  :class:`MemoryError` past a memory budget (a tool that hangs or explodes on one model does not
  stop a sweep);
* :func:`graphsel_prune`, :func:`graphsel_times` — graphsel's prune → fold_masks → materialize
  pipeline and the per-stage seconds it records;
* :func:`torch_pruning_prune` — Torch-Pruning's standard torchvision recipe (``BasePruner``,
  ``MagnitudeImportance(p=1)``, per-layer ratio, the final classifier ignored), timed as
  dependency-graph build and prune;
* :func:`write_results` — ``benchmarks/results/<stem>[_quick].json`` and ``.md``;
* :func:`mean_sd`, :func:`paired_difference`, :func:`decide` — statistics over seeds and the rule
  that turns a paired difference into a claim's status (the ``*_fidelity`` benchmarks).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


# -- environment ---------------------------------------------------------------------------

from graphsel.analysis.latency import _version, cpu_model  # noqa: E402  (one definition: the latency tables' cache key uses them)


def git_commit() -> str | None:
    """graphsel's commit (``+dirty`` when the working tree has changes)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Everything a reader needs to reproduce or discount a number."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "torch_pruning": _version("torch-pruning"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "graphsel_commit": git_commit(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average_at_start": load,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks." + Path(sys.argv[0]).stem] + sys.argv[1:]),
    }


def environment_line(env: dict[str, Any]) -> str:
    """One Markdown line summarising :func:`environment`."""
    return (f"torch {env['torch']}, torchvision {env['torchvision']}, torch-pruning {env['torch_pruning']}, "
            f"onnxruntime {env['onnxruntime']}; graphsel {env['graphsel_commit']}; {env['cpu']} "
            f"({env['cpu_count']} logical CPUs), {env['torch_threads']} torch thread(s); load average at start "
            f"{env['load_average_at_start']}; {env['date']}.")


_INTEROP_SET = False


def set_threads(n: int | None) -> int:
    """Use ``n`` threads in torch (intra-op; inter-op once per process); ``None`` keeps torch's default.
    Returns the intra-op thread count in effect (pass it to onnxruntime too)."""
    global _INTEROP_SET
    if n is not None:
        torch.set_num_threads(n)
        if not _INTEROP_SET:
            with contextlib.suppress(RuntimeError):  # only settable before any inter-op work
                torch.set_num_interop_threads(n)
            _INTEROP_SET = True
    return torch.get_num_threads()


# -- timing --------------------------------------------------------------------------------

def measure(candidates: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2,
            inner: int = 1, clock: Callable[[], float] = time.perf_counter) -> dict[str, dict[str, float]]:
    """Alternate the candidates ``repeats`` times after ``warmup`` calls each; per candidate the
    minimum, median and all per-call times in milliseconds (``inner`` calls per sample).
    ``clock=time.thread_time`` measures the calling thread's CPU time (less sensitive to load)."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(max(1, repeats)):
        for k, fn in candidates.items():
            t0 = clock()
            for _ in range(inner):
                fn()
            times[k].append((clock() - t0) / inner * 1e3)
    return {k: {"min_ms": min(v), "median_ms": statistics.median(v), "samples_ms": [round(t, 4) for t in v]}
            for k, v in times.items()}


def repeat_wall(job: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Run a heavy one-shot ``job`` ``repeats`` times (it must build its own fresh state);
    returns the wall seconds of each run and the last run's result."""
    secs, result = [], None
    for _ in range(max(1, repeats)):
        result = None
        t0 = time.perf_counter()
        result = job()
        secs.append(time.perf_counter() - t0)
    return secs, result


@contextlib.contextmanager
def time_limit(seconds: float | None, error: type[BaseException] = TimeoutError) -> Iterator[None]:
    """Raise ``error`` in the main thread when the block runs longer than ``seconds`` (Unix, main
    thread only; a no-op otherwise). Pure-Python loops are interrupted at once, a long native call
    when it returns."""
    usable = (seconds and seconds > 0 and hasattr(signal, "SIGALRM")
              and __import__("threading").current_thread() is __import__("threading").main_thread())
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise error(f"gave up after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _proc_kb(path: str, key: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (``MemAvailable``; Linux)."""
    kb = _proc_kb("/proc/meminfo", "MemAvailable")
    return kb * 1024 if kb is not None else None


@contextlib.contextmanager
def memory_limit(extra_bytes: float | None) -> Iterator[None]:
    """Cap the process's address space at its current size + ``extra_bytes`` inside the block, so that
    a tool whose memory explodes raises :class:`MemoryError` (caught per model) instead of the
    kernel's OOM killer ending the whole sweep — and other processes on the machine. Linux only;
    a no-op elsewhere or for ``None``."""
    try:
        import resource
    except ImportError:
        resource = None
    vm_kb = _proc_kb("/proc/self/status", "VmSize")
    if not extra_bytes or resource is None or vm_kb is None:
        yield
        return
    old = resource.getrlimit(resource.RLIMIT_AS)
    cap = int(vm_kb * 1024 + extra_bytes)
    if old[1] != resource.RLIM_INFINITY:
        cap = min(cap, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (cap, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


def error_record(e: BaseException, frames: int = 6) -> dict[str, str]:
    """A JSON-friendly error: type, message, and the innermost traceback frames."""
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return {"type": type(e).__name__, "message": str(e), "traceback": "".join(tb[-frames:])}


def short_error(err: dict[str, str] | None, width: int = 160) -> str:
    if not err:
        return ""
    first = (err["message"].strip().splitlines() or [""])[0]
    s = f"{err['type']}: {first}" if first else err["type"]
    return s if len(s) <= width else s[: width - 1] + "…"


# -- model zoo -----------------------------------------------------------------------------

def classification_models() -> list[str]:
    """torchvision's classification models (``list_models(module=torchvision.models)``)."""
    import torchvision
    return list(torchvision.models.list_models(module=torchvision.models))


# Models whose forward depends on a fixed input size (position embeddings, window partitions).
FIXED_224 = ("vit_", "maxvit_", "swin_")


def input_size(name: str, small: int = 64) -> int:
    """The square input side used for ``name``: ``small`` where the model allows it, 224 for models
    built for a fixed size (ViT, MaxViT, Swin), 96 for inception_v3 (its minimum is 75)."""
    if name.startswith(FIXED_224):
        return 224
    if name.startswith("inception"):
        return max(small, 96)
    return small


def build_model(name: str) -> torch.nn.Module:
    """A torchvision classification model with random weights, in eval mode (nothing downloaded).
    GoogLeNet / Inception are built without their auxiliary heads (unused in eval)."""
    import torchvision
    kwargs: dict[str, Any] = {"weights": None}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    return torchvision.models.get_model(name, **kwargs).eval()


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- results -------------------------------------------------------------------------------

def result_stem(stem: str, quick: bool) -> str:
    return f"{stem}_quick" if quick else stem


def write_results(stem: str, data: dict[str, Any], markdown: str, out_dir: Path = RESULTS,
                  quick: bool = False) -> tuple[Path, Path]:
    """Write ``<out_dir>/<stem>[_quick].json`` and ``.md``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / result_stem(stem, quick)
    js, md = base.with_suffix(".json"), base.with_suffix(".md")
    js.write_text(json.dumps(data, indent=1, default=str) + "\n")
    md.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return js, md


def table(rows: list[list[Any]], headers: list[str]) -> str:
    """A GitHub-flavoured Markdown table."""
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def human(n: float | None, unit: str = "") -> str:
    """3 significant digits with a k/M/G suffix (``None`` → "—")."""
    if n is None:
        return "—"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:.3g}{unit}"


# -- the two pruning tools -----------------------------------------------------------------

def prune_passes(ratio: float = 0.5, round_to: int | None = None, scope: str = "uniform",
                 criterion: str = "l1") -> list:
    """graphsel's pipeline: choose channels, drop dead ones, slice the weights."""
    opts: dict[str, Any] = {"ratio": ratio, "criterion": criterion, "scope": scope}
    if round_to:
        opts["round_to"] = round_to
    return [("prune", opts), "fold_masks", "materialize"]


def graphsel_prune(model: torch.nn.Module, example: tuple, *, ratio: float = 0.5, round_to: int | None = None,
                   scope: str = "uniform", verify: bool = True):
    """Trace, analyse, prune, fold and materialise ``model`` (a deep copy; the model is untouched)."""
    import graphsel
    return graphsel.transform(model, prune_passes(ratio, round_to, scope), example, verify=verify, progress=False)


def graphsel_times(gm, total: float | None = None) -> dict[str, float]:
    """Seconds per stage from the pipeline's records: trace (incl. shape propagation), each pass
    (``prune`` includes the channel analysis), verification, and — given the wall ``total`` — the
    pipeline's own overhead (deep copies, cost and shape re-propagation, lint)."""
    import graphsel
    meta = graphsel.graphsel_meta(gm)
    out = {"trace": meta.trace_seconds}
    for rec in meta.history:
        out[rec.name] = out.get(rec.name, 0.0) + rec.seconds
    out["verify"] = sum(rec.verify_seconds for rec in meta.history)
    if total is not None:
        out["pipeline_overhead"] = max(0.0, total - sum(out.values()))
        out["total"] = total
    return out


def classifier_modules(model: torch.nn.Module, num_classes: int = 1000) -> list[torch.nn.Module]:
    """The final classifier: the last Linear or Conv2d (SqueezeNet) with ``num_classes`` outputs."""
    import torch.nn as nn
    found = [m for m in model.modules()
             if (isinstance(m, nn.Linear) and m.out_features == num_classes)
             or (isinstance(m, nn.Conv2d) and m.out_channels == num_classes)]
    return found[-1:]


def torch_pruning_prune(model: torch.nn.Module, example: tuple, *, ratio: float = 0.5,
                        round_to: int | None = None) -> dict[str, Any]:
    """Prune ``model`` in place with Torch-Pruning's standard recipe for torchvision (its
    ``examples/torchvision_models`` script): ``BasePruner`` with ``MagnitudeImportance(p=1)``,
    ``pruning_ratio=ratio`` per layer (``global_pruning=False``), the final classifier ignored,
    ``num_heads`` given for every ``nn.MultiheadAttention`` and ViT's ``hidden_dim`` updated after
    pruning (torchvision reads it in forward). Returns the model and the seconds of the
    dependency-graph build (the pruner's construction) and of the pruning step."""
    import torch.nn as nn
    import torch_pruning as tp
    from torchvision.models.vision_transformer import VisionTransformer

    num_heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    t0 = time.perf_counter()
    pruner = tp.pruner.BasePruner(
        model, example_inputs=example[0] if len(example) == 1 else example,
        importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio, global_pruning=False,
        ignored_layers=classifier_modules(model), round_to=round_to, num_heads=num_heads,
        # fresh dicts: BasePruner's defaults are shared mutable dicts that it updates in place
        in_channel_groups={}, out_channel_groups={})
    t1 = time.perf_counter()
    pruner.step()
    if isinstance(model, VisionTransformer):
        model.hidden_dim = model.conv_proj.out_channels
    t2 = time.perf_counter()
    return {"model": model, "build_s": t1 - t0, "prune_s": t2 - t1}


# -- statistics over seeds -----------------------------------------------------------------

CLAIM_STATUSES = ("reproduced", "not reproduced", "undecided")


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom (4.303 for df = 2)."""
    from scipy.stats import t
    return float(t.ppf(0.5 + level / 2, df))


def paired_difference(a: dict[Any, float], b: dict[Any, float], level: float = 0.95) -> dict[str, Any]:
    """``a − b`` over the keys (seeds) both hold: per-key differences, their mean, sample sd and the
    ``level`` confidence interval of the mean (Student's t, n − 1 degrees of freedom; None for n < 2)."""
    keys = sorted(set(a) & set(b))
    diffs = [a[k] - b[k] for k in keys]
    out: dict[str, Any] = {"keys": keys, "diffs": diffs, "n": len(diffs), "level": level,
                           "mean": statistics.mean(diffs) if diffs else None, "sd": None, "ci": None}
    if len(diffs) >= 2:
        sd = statistics.stdev(diffs)
        half = t_quantile(len(diffs) - 1, level) * sd / len(diffs) ** 0.5
        out.update(sd=sd, ci=[out["mean"] - half, out["mean"] + half])
    return out


def decide(ci: list[float] | None, threshold: float = 0.0) -> str:
    """The status of a claim "the paired difference is greater than ``threshold``" (0: the method is
    better; −δ: it is at most δ worse) from the difference's confidence interval:
    ``reproduced`` when the whole interval lies above the threshold, ``not reproduced`` when it lies
    below, ``undecided`` when it contains the threshold (or there is no interval)."""
    if ci is None:
        return "undecided"
    lo, hi = ci
    if lo > threshold:
        return "reproduced"
    if hi < threshold:
        return "not reproduced"
    return "undecided"


def previous_runs(stem: str, config: dict[str, Any], keys: tuple[str, ...], seeds: list[int], out_dir: Path = RESULTS,
                  quick: bool = False) -> list[dict[str, Any]]:
    """The ``runs`` of an earlier results file ``<stem>[_quick].json`` whose seeds this invocation does not
    run (``--append``: a long benchmark split over several invocations by ``--seeds``). The settings in
    ``keys`` must match the earlier file's ``config``; a mismatch is an error."""
    path = Path(out_dir) / f"{result_stem(stem, quick)}.json"
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    differ = {k: (old["config"].get(k), config.get(k)) for k in keys if old["config"].get(k) != config.get(k)}
    if differ:
        raise SystemExit(f"--append: {path} was made with other settings: "
                         + ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in differ.items()))
    return [r for r in old.get("runs", []) if r["seed"] not in seeds]
