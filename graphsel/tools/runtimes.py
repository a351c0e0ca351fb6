"""``graphsel.benchmark_runtimes``: which runtime runs this model fastest, here?

Times a model (typically the slim one ``graphsel.transform`` returned) in every runtime of
:data:`graphsel.analysis.latency.RUNTIMES` that can run on this machine — eager, torch.compile
(inductor), AOTInductor packages, onnxruntime — in the same process with the same threads:
each runtime is prepared first (export / compilation, timed apart as ``compile s``), checked
against the eager outputs, then all are timed interleaved round by round after a warm-up, with
an untimed settling call before each timed call (worker threads a runtime leaves spinning do not
run into the next one's timing); medians and quartiles are reported. A runtime that cannot run
here (no C++ compiler for inductor / AOTInductor, onnxruntime missing, an export that fails) is a
row ``unavailable: <reason>``, never an error. The table names the fastest runtime and the
export format that deploys it: ``graphsel.export(gm, path, table.export_format)``.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
from tabulate import tabulate
from tqdm.auto import tqdm

from graphsel.analysis.latency import (RUNTIMES, RuntimeUnavailable, _outputs, check_runtime_name, cpu_model, prepare_runtime,
                                       time_runners, torch_threads)
from graphsel.errors import ExampleInputError
from graphsel.ir.tracing import as_tuple, example_inputs_of

#: the :func:`graphsel.export` format that deploys each runtime
EXPORT_FORMAT = {"eager": "pt2", "inductor": "pt2", "aoti": "aoti", "onnxruntime": "onnx"}
#: how the exported artefact is run in that runtime
DEPLOY = {"eager": "torch.export.load(path).module()",
          "inductor": "torch.compile(torch.export.load(path).module())",
          "aoti": "torch._inductor.aoti_load_package(path)",
          "onnxruntime": "onnxruntime.InferenceSession(path)"}
# outputs may differ from eager by atol + rtol * max|eager output| (compilers reorder sums)
CHECK_TOLERANCE = (1e-3, 1e-3)


@dataclass
class RuntimeRow:
    """One runtime: ``status`` is ``"ok"``, ``"unavailable: <reason>"`` or ``"failed: <reason>"``."""
    runtime: str
    status: str
    median_ms: float | None = None
    q1_ms: float | None = None
    q3_ms: float | None = None
    min_ms: float | None = None
    compile_seconds: float | None = None
    max_abs_error: float | None = None
    method: str = ""
    samples_ms: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class RuntimeTable:
    """What :func:`benchmark_runtimes` measured: a row per runtime, the ``fastest`` (None when no
    runtime ran) and the settings. ``export_format``: the :func:`graphsel.export` format of the
    fastest runtime; ``deploy``: how to run that artefact."""
    rows: list[RuntimeRow]
    fastest: str | None
    threads: int
    inputs: list[str]
    repeats: int
    warmup: int
    cpu: str

    @property
    def export_format(self) -> str | None:
        return EXPORT_FORMAT.get(self.fastest) if self.fastest else None

    @property
    def deploy(self) -> str | None:
        return DEPLOY.get(self.fastest) if self.fastest else None

    def row(self, runtime: str) -> RuntimeRow:
        for r in self.rows:
            if r.runtime == runtime:
                return r
        raise KeyError(f"runtime '{runtime}' was not benchmarked; rows: {', '.join(r.runtime for r in self.rows)}")

    def __getitem__(self, runtime: str) -> RuntimeRow:
        return self.row(runtime)

    def __str__(self) -> str:
        eager = next((r for r in self.rows if r.runtime == "eager" and r.ok), None)
        body = []
        for r in self.rows:
            if r.ok:
                speed = f"×{eager.median_ms / r.median_ms:.2f}" if eager and r.median_ms else "—"
                body.append([r.runtime + (" ◀ fastest" if r.runtime == self.fastest else ""), f"{r.median_ms:.3f}",
                             f"{r.q1_ms:.3f}–{r.q3_ms:.3f}", speed, f"{r.compile_seconds:.1f}",
                             f"{r.max_abs_error:.1e}" if r.max_abs_error is not None else "—", r.method])
            else:
                body.append([r.runtime, "—", "—", "—", "—", "—", r.status])
        head = (f"runtimes on {self.cpu}, {self.threads} thread(s), inputs {', '.join(self.inputs)}: median of "
                f"{self.repeats} interleaved runs after {self.warmup} warm-up(s)")
        table = tabulate(body, headers=["runtime", "median ms", "IQR ms", "vs eager", "compile s", "max abs err",
                                        "how / status"], tablefmt="github", disable_numparse=True)
        tail = (f"fastest: {self.fastest}; deploy with graphsel.export(gm, path, '{self.export_format}') and "
                f"{self.deploy}") if self.fastest else "no runtime ran"
        return f"{head}\n{table}\n{tail}"

    def to_dict(self) -> dict[str, Any]:
        return {"fastest": self.fastest, "export_format": self.export_format, "deploy": self.deploy,
                "threads": self.threads, "inputs": self.inputs, "repeats": self.repeats, "warmup": self.warmup,
                "cpu": self.cpu, "rows": [asdict(r) for r in self.rows]}


def benchmark_runtimes(model: nn.Module, example_inputs: Any = None, *, runtimes: Sequence[str] = RUNTIMES,
                       threads: int | None = None, repeats: int = 30, warmup: int = 3, settle: int = 1,
                       progress: bool | None = None) -> RuntimeTable:
    """Time ``model`` in each of ``runtimes`` (module docstring) and name the fastest.

    ``example_inputs`` (a tensor or tuple of tensors) default to the inputs a graphsel graph was
    traced with. ``threads``: intra-op threads for every runtime (default: torch's setting).
    ``repeats``: timed runs per runtime (interleaved), after ``warmup`` untimed ones; ``settle``:
    untimed calls before each timed one. Returns a :class:`RuntimeTable` (``print`` it)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"benchmark_runtimes expects a torch.nn.Module, got {type(model).__name__}")
    names = [check_runtime_name(r) for r in runtimes]
    if not names:
        raise ValueError(f"runtimes is empty; choose from {', '.join(RUNTIMES)}")
    if not isinstance(repeats, int) or repeats < 1 or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats!r}, warmup={warmup!r}")
    inputs = as_tuple(example_inputs)
    if inputs is None:
        import torch.fx as fx
        inputs = example_inputs_of(model) if isinstance(model, fx.GraphModule) else None
    if inputs is None:
        raise ExampleInputError("benchmark_runtimes needs example inputs: this model carries none (it was not traced "
                                "by graphsel); pass example_inputs=(torch.randn(1, 3, 224, 224),) or similar")
    threads = int(threads or torch.get_num_threads())
    with torch_threads(threads), torch.inference_mode():
        was = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            ref = [t.detach().float().cpu() for t in _outputs(model(*inputs))]
        finally:
            for m, t in was:
                m.training = t
    rows: dict[str, RuntimeRow] = {}
    runners = {}
    bar = tqdm(names, desc="preparing runtimes", leave=False, disable=(not progress) if progress is not None else None,
               file=sys.stderr)
    for name in bar:
        bar.set_postfix_str(name)
        try:
            runner = prepare_runtime(model, inputs, name, threads=threads)
        except RuntimeUnavailable as e:
            rows[name] = RuntimeRow(name, f"unavailable: {e.reason}")
            continue
        err = _max_error(ref, runner.outputs)
        rows[name] = RuntimeRow(name, "ok", compile_seconds=runner.compile_seconds, max_abs_error=err,
                                method=runner.method)
        scale = max((float(t.abs().max()) for t in ref if t.numel()), default=0.0)
        if err is None or not err <= CHECK_TOLERANCE[0] + CHECK_TOLERANCE[1] * scale:
            rows[name].status = (f"failed: outputs differ from eager by {err:.3g}" if err is not None
                                 else "failed: outputs do not match eager's in number or shape")
            continue
        runners[name] = runner
    bar.close()
    if runners:
        timings = time_runners({k: r.run for k, r in runners.items()}, repeats=repeats, warmup=warmup, settle=settle,
                               threads=threads, progress=progress, desc="timing runtimes")
        for k, t in timings.items():
            rows[k].median_ms, rows[k].q1_ms, rows[k].q3_ms, rows[k].min_ms = t.median_ms, t.q1_ms, t.q3_ms, t.min_ms
            rows[k].samples_ms = t.samples_ms
    ok = [rows[k] for k in names if rows[k].ok and rows[k].median_ms is not None]
    fastest = min(ok, key=lambda r: r.median_ms).runtime if ok else None
    shapes = [("x".join(map(str, t.shape)) + f" {str(t.dtype).replace('torch.', '')}") if isinstance(t, torch.Tensor)
              else type(t).__name__ for t in inputs]
    return RuntimeTable([rows[k] for k in names], fastest, threads, shapes, repeats, warmup, cpu_model())


def _max_error(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float | None:
    if len(ref) != len(got) or any(a.shape != b.shape for a, b in zip(ref, got)):
        return None
    return max((float((a - b).abs().max()) for a, b in zip(ref, got) if a.numel()), default=0.0)
