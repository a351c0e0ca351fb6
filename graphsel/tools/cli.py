"""The ``graphsel`` command (also ``python -m graphsel``).

::

    graphsel demo [--out DIR]                         # ResNet-18 through the default slimming pipeline
    graphsel convert MODEL --passes a,b,c [--pass-opt prune.ratio=0.3 ...] [--input-shape 1,3,224,224]
                     --out PATH [--format pt2|onnx|torchscript|pickle|graphsel] [--no-verify]
                     [--weights PATH] [--trust-pickle]
    graphsel report PATH [--json] [--trust-pickle]    # pass history of a graphsel checkpoint
    graphsel passes                                   # registered passes, contracts, options
    graphsel cost MODEL [--input-shape ...] [--top N] [--weights PATH] [--trust-pickle]
    graphsel bench-runtimes MODEL [--input-shape ...] [--runtimes eager,inductor,aoti,onnxruntime]
                     [--threads N] [--repeats N] [--json]   # time MODEL in every runtime, name the fastest

MODEL is ``torchvision:NAME``, ``timm:NAME``, ``graphsel:NAME``, ``package.module:factory`` or a
saved model file (see :mod:`graphsel.tools.zoo`). Files are read as data: graphsel checkpoints
(``*.graphsel``) and, with ``--weights``, state dicts; a file that would run code when loaded
(a pickle, ``.pt2``, TorchScript) is refused unless ``--trust-pickle`` is given. Bad input gets a
one-line message and exit code 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import inspect
import re

import torch
from tabulate import tabulate
from tqdm.auto import tqdm

from graphsel.analysis.cost import cost
from graphsel.errors import GraphselError
from graphsel.ir.meta import graphsel_meta
from graphsel.pipeline.phases import transform
from graphsel.pipeline.registry import available_passes, pass_options, resolve_passes
from graphsel.pipeline.report import human, report
from graphsel.pipeline.verify import eval_mode
from graphsel.tools.checkpoint import SUFFIX, is_checkpoint, read_report
from graphsel.tools.export import SUFFIXES, export
from graphsel.tools.sconv_demo import selective_convolution
from graphsel.tools.zoo import load_file, load_model, save
from graphsel.version import __version__

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2

# The demo's slimming pipeline. Extend it here (it is data: names or (name, {options}) pairs).
DEMO_PIPELINE: list[Any] = [
    ("prune", {"ratio": 0.5, "round_to": 8}),
    "fold_masks",
    "materialize",
    "fuse_bn",
]
DEMO_MODEL = "torchvision:resnet18"
DEMO_INPUT_SHAPE = (1, 3, 224, 224)
DEMO_EXPORT_FORMATS = ("pt2", "pickle")
# Further demo sections (the selective-convolution example): ``section(out_dir, log) -> dict``
# runs after the main demo; its JSON-ready summary is stored under its ``__name__`` in report.json.
DEMO_SECTIONS: tuple[Callable[[Path, Callable[[str], None]], dict], ...] = (selective_convolution,)

CONVERT_FORMATS = ("pt2", "onnx", "torchscript", "pickle", "aoti", "graphsel")


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


# ================================================================================================
# small helpers

def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` or ``"1x3x224x224"`` → ``(1, 3, 224, 224)``."""
    parts = [p.strip() for p in text.replace("x", ",").replace("×", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"bad --input-shape '{text}': expected comma-separated integers such as 1,3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"bad --input-shape '{text}': every dimension must be a positive integer")
    return shape


def make_inputs(shapes: Sequence[str] | None) -> tuple | None:
    if not shapes:
        return None
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(parse_shape(s), generator=gen) for s in shapes)


def parse_pass_options(items: Sequence[str] | None, pass_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["prune.ratio=0.3", "prune.criterion=bn_gamma"]`` → ``{"prune": {"ratio": 0.3, "criterion": "bn_gamma"}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or ():
        key, eq, raw = item.partition("=")
        name, dot, option = key.strip().partition(".")
        if not eq or not dot or not name or not option:
            raise UsageError(f"bad --pass-opt '{item}': expected PASS.OPTION=VALUE, e.g. prune.ratio=0.3")
        if name not in pass_names:
            raise UsageError(f"--pass-opt '{item}' is for pass '{name}', which is not in --passes "
                             f"({', '.join(pass_names) or 'none'})")
        out.setdefault(name, {})[option] = _literal(raw.strip())
    return out


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word: a string option such as criterion=bn_gamma


def measure_latency(model, inputs: tuple, *, min_seconds: float = 1.0, warmup: int = 3, max_runs: int = 200) -> float:
    """Median eager wall time of ``model(*inputs)`` in milliseconds (eval mode, inference mode)."""
    times: list[float] = []
    with eval_mode(model), torch.inference_mode():
        for _ in range(warmup):
            model(*inputs)
        start = time.perf_counter()
        while len(times) < max_runs and (len(times) < 5 or time.perf_counter() - start < min_seconds):
            t0 = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@contextlib.contextmanager
def stage(desc: str):
    """A tqdm line with the elapsed time of a step that may take seconds (shown on terminals only)."""
    bar = tqdm(total=1, desc=desc, bar_format="{desc}: {elapsed}", leave=False, disable=None, file=sys.stderr)
    try:
        yield bar
        bar.update(1)
    finally:
        bar.close()


def _json_ready(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _json_ready(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def history_json(gm) -> dict[str, Any]:
    """The graphsel metadata of ``gm`` as JSON-ready data (inputs, notes, leafed modules, pass rows)."""
    meta = graphsel_meta(gm, create=False)
    if meta is None:
        return {}
    return {"model_class": meta.model_class, "trace_seconds": meta.trace_seconds,
            "inputs": [str(i) for i in meta.inputs], "notes": list(meta.notes),
            "leafed": _json_ready(meta.leafed), "passes": _json_ready(meta.history)}


def summary_line(doc: str, width: int = 100) -> str:
    """The first sentence of a docstring's first paragraph, without reST markup."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    para = re.sub(r":\w+:`~?([^`]+)`", r"\1", para).replace("``", "")
    m = re.search(r"(?<=[.!?])\s(?=[A-Z])", para)
    first = para[:m.start()] if m else para
    return first if len(first) <= width else first[:width - 1].rstrip() + "…"


def _human(n: float) -> str:
    return human(n)


def _out(text: str = "") -> None:
    print(text, flush=True)


# ================================================================================================
# commands

def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = load_model(DEMO_MODEL).eval()
    x = torch.randn(DEMO_INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    _out(f"graphsel demo: {DEMO_MODEL} (random weights, no downloads), input {tuple(x.shape)}")
    _out("pipeline: " + ", ".join(p if isinstance(p, str) else f"{p[0]}{p[1]}" for p in DEMO_PIPELINE))

    cost_before = cost(model, (x,))
    gm = transform(model, DEMO_PIPELINE, (x,), progress=None)
    cost_after = cost(gm, (x,))
    report_text = report(gm)
    _out()
    _out(report_text)

    with stage("measuring eager latency"):
        lat_before = measure_latency(model, (x,), min_seconds=args.latency_seconds)
        lat_after = measure_latency(gm, (x,), min_seconds=args.latency_seconds)
    summary = _before_after_table(cost_before, cost_after, lat_before, lat_after)
    _out()
    _out(summary)

    exports = []
    for fmt in DEMO_EXPORT_FORMATS:
        with stage(f"export {fmt}"):
            exports.append(export(gm, out / f"resnet18_slim{_suffix(fmt)}", fmt, (x,)))
    checkpoint = save(gm, out / f"resnet18_slim{SUFFIX}")

    sections = {}
    for section in DEMO_SECTIONS:
        sections[section.__name__] = section(out, _out)

    text = "\n\n".join([report_text, summary] + [str(r) for r in exports])
    (out / "report.txt").write_text(text + "\n", encoding="utf-8")
    data = {"model": DEMO_MODEL, "input_shape": list(DEMO_INPUT_SHAPE), "pipeline": _json_ready(DEMO_PIPELINE),
            "cost_before": cost_before.to_dict(), "cost_after": cost_after.to_dict(),
            "latency_ms_batch1_eager": {"before": lat_before, "after": lat_after,
                                        "threads": torch.get_num_threads()},
            "exports": [r.to_dict() for r in exports], "checkpoint": str(checkpoint),
            "history": history_json(gm), "sections": _json_ready(sections)}
    (out / "report.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    _out()
    for r in exports:
        _out(f"wrote {r}")
    _out(f"wrote {checkpoint} (graphsel checkpoint with pass history: graphsel report {checkpoint})")
    _out(f"wrote {out / 'report.txt'} and {out / 'report.json'}")
    return EXIT_OK


def _suffix(fmt: str) -> str:
    return SUFFIXES[fmt]


def _before_after_table(before, after, lat_before: float, lat_after: float) -> str:
    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}×" if b else "-"

    rows = [["params", _human(before.params), _human(after.params), ratio(before.params, after.params)],
            ["MACs", _human(before.macs), _human(after.macs), ratio(before.macs, after.macs)],
            [f"eager latency, batch 1 ({torch.get_num_threads()} threads)", f"{lat_before:.1f} ms",
             f"{lat_after:.1f} ms", ratio(lat_before, lat_after)]]
    return tabulate(rows, headers=["", "before", "after", "reduction"], tablefmt="github")


def cmd_convert(args: argparse.Namespace) -> int:
    names = [p.strip() for p in args.passes.split(",") if p.strip()]
    if not names:
        raise UsageError("--passes is empty: give registered pass names, e.g. --passes fuse_bn (see: graphsel passes)")
    options = parse_pass_options(args.pass_opt, names)
    pipeline = [(n, options[n]) if n in options else n for n in names]
    resolve_passes(pipeline)  # unknown names and options fail here, before the model is loaded
    inputs = make_inputs(args.input_shape)
    with stage(f"loading {args.model}"):
        model = _load(args).eval()
    gm = transform(model, pipeline, inputs, verify=not args.no_verify, progress=None)
    _out(report(gm))
    with stage(f"export {args.format}"):
        result = export(gm, args.out, args.format, check=not args.no_verify)
    _out(f"\nwrote {result}")
    if args.format == "graphsel":
        _out(f"(a graphsel checkpoint, data only: graphsel report {result.path})")
    for w in result.warnings:
        _out(f"warning: {w}")
    return EXIT_OK


def _load(args: argparse.Namespace):
    """MODEL with --weights and --trust-pickle (see graphsel.tools.zoo.load_model)."""
    kwargs = {"weights": args.weights} if getattr(args, "weights", None) else {}
    return load_model(args.model, trust_pickle=args.trust_pickle, **kwargs)


def cmd_report(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_file() and is_checkpoint(path):
        gm = read_report(path)           # meta.json only: no tensors, no modules, no code
    else:
        gm = load_file(args.path, trust_pickle=args.trust_pickle)
    if graphsel_meta(gm, create=False) is None:
        raise UsageError(f"{args.path} holds a {type(gm).__name__} without graphsel history (export artefacts and "
                         f"plain torch.save pickles drop it); save with graphsel.save(gm, path) or "
                         f"graphsel convert ... --format graphsel")
    if args.json:
        _out(json.dumps(history_json(gm), indent=2))
    else:
        _out(report(gm))
    return EXIT_OK


def cmd_passes(args: argparse.Namespace) -> int:
    rows = []
    for name, cls in available_passes().items():
        opts = []
        for opt, default in pass_options(cls).items():
            opts.append(f"{opt} (required)" if default is inspect.Parameter.empty else f"{opt}={default!r}")
        rows.append([name, str(cls.contract), "\n".join(opts) if args.long else ", ".join(opts) or "-",
                     summary_line(inspect.getdoc(cls) or "")])
    if args.json:
        _out(json.dumps([{"name": r[0], "contract": r[1], "options": r[2], "doc": r[3]} for r in rows], indent=2))
    else:
        _out(tabulate(rows, headers=["pass", "contract", "options", "description"], tablefmt="simple"))
    return EXIT_OK


def cmd_cost(args: argparse.Namespace) -> int:
    inputs = make_inputs(args.input_shape)
    with stage(f"loading {args.model}"):
        model = _load(args).eval()
    with stage("cost analysis"):
        report = cost(model, inputs)
    if args.json:
        _out(json.dumps(report.to_dict(), indent=2))
        return EXIT_OK
    _out(report.table(top=args.top))
    _out()
    _out(report.summary())
    return EXIT_OK


def cmd_bench_runtimes(args: argparse.Namespace) -> int:
    from graphsel.analysis.latency import RUNTIMES
    from graphsel.ir.tracing import example_inputs_of, trace
    from graphsel.tools.runtimes import benchmark_runtimes

    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()] if args.runtimes else list(RUNTIMES)
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown or not runtimes:
        raise UsageError(f"--runtimes: unknown runtime(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(RUNTIMES)}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be a positive integer, got {args.threads}")
    if args.repeats < 1:
        raise UsageError(f"--repeats must be a positive integer, got {args.repeats}")
    inputs = make_inputs(args.input_shape)
    with stage(f"loading {args.model}"):
        model = _load(args).eval()
    if inputs is None:                  # infer an image input (graphsel models carry theirs)
        inputs = example_inputs_of(model) if graphsel_meta(model, create=False) is not None else None
        if inputs is None:
            with stage("tracing to infer the input shape"):
                model = trace(model)
            inputs = example_inputs_of(model)
    table = benchmark_runtimes(model, inputs, runtimes=runtimes, threads=args.threads, repeats=args.repeats,
                               warmup=args.warmup, progress=None)
    if args.json:
        _out(json.dumps(_json_ready(table.to_dict()), indent=2))
    else:
        _out(str(table))
    return EXIT_OK if table.fastest else EXIT_FAILURE


# ================================================================================================
# parser and entry point

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="graphsel",
        description="graphsel: a channel-level graph compiler for PyTorch (torch.fx).",
        epilog="MODEL: torchvision:NAME | timm:NAME | graphsel:NAME | package.module:factory | a graphsel "
               f"checkpoint (*{SUFFIX}, data only). Files that would run code when loaded (pickles, .pt2, "
               "TorchScript) need --trust-pickle. Add --debug for tracebacks.")
    p.add_argument("--version", action="version", version=f"graphsel {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="slim a random-weight ResNet-18 and export it (no downloads)",
                       description="A random-initialised torchvision ResNet-18 through the default slimming pipeline "
                                   f"({', '.join(p if isinstance(p, str) else p[0] for p in DEMO_PIPELINE)}); "
                                   "prints the report, costs and latency; writes the model and report.")
    d.add_argument("--out", default="graphsel-out", help="output directory (default: ./graphsel-out)")
    d.add_argument("--latency-seconds", type=float, default=1.0, help="time spent measuring each latency (default 1)")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("convert", help="run passes on a model and export the result")
    c.add_argument("model", metavar="MODEL")
    c.add_argument("--passes", required=True, help="comma-separated pass names, e.g. prune,fold_masks,materialize")
    c.add_argument("--pass-opt", action="append", metavar="PASS.OPTION=VALUE",
                   help="a pass option, e.g. prune.ratio=0.3 (repeatable; values are Python literals or words)")
    c.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="example input shape, e.g. 1,3,224,224 (repeat for several inputs; default: inferred "
                        "from the first convolution)")
    c.add_argument("--out", required=True, help="output file (or directory)")
    c.add_argument("--format", choices=CONVERT_FORMATS, default="pt2",
                   help="pt2 (torch.export), onnx, torchscript, pickle (plain GraphModule), or graphsel "
                        f"(*{SUFFIX}: checkpoint with pass history, data only); default pt2")
    c.add_argument("--no-verify", action="store_true", help="skip contract verification and the export check")
    _file_options(c, weights=True)
    c.set_defaults(func=cmd_convert)

    r = sub.add_parser("report", help="the pass history of a graphsel checkpoint (read as data, model not built)")
    r.add_argument("path", metavar="PATH")
    r.add_argument("--json", action="store_true", help="print JSON")
    _file_options(r, weights=False)
    r.set_defaults(func=cmd_report)

    ps = sub.add_parser("passes", help="registered passes with their contracts and options")
    ps.add_argument("--json", action="store_true", help="print JSON")
    ps.add_argument("--long", action="store_true", help="one option per line")
    ps.set_defaults(func=cmd_passes)

    co = sub.add_parser("cost", help="parameters, MACs and activation memory per node")
    co.add_argument("model", metavar="MODEL")
    co.add_argument("--input-shape", action="append", metavar="SHAPE",
                    help="example input shape (repeatable; default: inferred)")
    co.add_argument("--top", type=int, default=None, help="only the N most expensive nodes")
    co.add_argument("--json", action="store_true", help="print the totals as JSON")
    _file_options(co, weights=True)
    co.set_defaults(func=cmd_cost)

    b = sub.add_parser("bench-runtimes", help="time MODEL in eager, inductor, AOTInductor and onnxruntime; name the "
                                              "fastest",
                       description="Times MODEL in every runtime that runs here (same process, same threads, "
                                   "interleaved runs after a warm-up, medians); unavailable runtimes are reported "
                                   "with the reason. MODEL may be a graphsel checkpoint of a slim model.")
    b.add_argument("model", metavar="MODEL")
    b.add_argument("--input-shape", action="append", metavar="SHAPE",
                   help="example input shape, e.g. 1,3,224,224 (repeatable; default: inferred)")
    b.add_argument("--runtimes", default=None, help="comma-separated subset of eager,inductor,aoti,onnxruntime "
                                                    "(default: all)")
    b.add_argument("--threads", type=int, default=None, help="intra-op threads for every runtime (default: torch's)")
    b.add_argument("--repeats", type=int, default=30, help="timed runs per runtime (default 30)")
    b.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    b.add_argument("--json", action="store_true", help="print the table as JSON")
    _file_options(b, weights=True)
    b.set_defaults(func=cmd_bench_runtimes)
    return p


def _file_options(p: argparse.ArgumentParser, weights: bool) -> None:
    if weights:
        p.add_argument("--weights", metavar="PATH",
                       help="a state dict (torch.save, read with weights_only=True, or .safetensors) to load into "
                            "MODEL, e.g. torchvision:resnet18 --weights resnet18.pth")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow files that run code when loaded (torch.save pickles of modules, old .graphsel.pt "
                        "checkpoints, .pt2 and TorchScript archives); only for files you trust")


def _bad_input_types() -> tuple[type[BaseException], ...]:
    return (UsageError, GraphselError, ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, PermissionError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else EXIT_BAD_INPUT
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("graphsel: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        if debug:
            traceback.print_exc()
        bad = isinstance(e, _bad_input_types())
        message = " ".join(str(e).split()) if not isinstance(e, KeyError) else str(e.args[0] if e.args else e)
        message = message or type(e).__name__
        print(f"graphsel {args.command}: error: {message}", file=sys.stderr)
        if not bad and not debug:
            print("graphsel: this looks like a bug in graphsel; rerun with --debug and report the traceback",
                  file=sys.stderr)
        return EXIT_BAD_INPUT if bad else EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
