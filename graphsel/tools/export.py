"""``graphsel.export``: write a model as an artefact that loads and runs without graphsel.

Formats (``format=``):

* ``"pt2"``: ``torch.export.export`` + ``torch.export.save``; load with ``torch.export.load(path).module()``.
* ``"onnx"``: ``torch.onnx.export(..., dynamo=True)`` (the legacy TorchScript-based exporter is
  used, with a warning, when the dynamo exporter fails); checked against onnxruntime.
* ``"aoti"``: an AOTInductor package (``torch.export`` + ``torch._inductor.aoti_compile_and_package``:
  the model compiled to a shared library, the fastest torch runtime on many CPUs); load with
  ``torch._inductor.aoti_load_package(path)``. Needs a C++ compiler when exporting (not in
  ``FORMATS``: see ``COMPILED_FORMATS``).
* ``"torchscript"``: ``torch.jit.script`` (``torch.jit.trace`` with a warning when scripting
  fails) + ``torch.jit.save``; load with ``torch.jit.load(path)``.
* ``"pickle"``: ``torch.save`` of a plain ``torch.fx.GraphModule``; load with
  ``torch.load(path, weights_only=False)`` (this unpickles code: load only files you trust;
  ``graphsel.load_model`` refuses it without ``trust_pickle=True``).
* ``"graphsel"``: graphsel's own checkpoint (:func:`graphsel.save`: JSON and safetensors in a zip,
  pass history and masks kept); loads with ``graphsel.load_model(path)`` without running code
  from the file, but needs graphsel. The model is written as it is (not an eval copy) and the
  check is exact (tolerance 0). Not in ``FORMATS``, the formats that need no graphsel.

The model is exported in eval mode (a copy; the caller's model is not touched). Before export,
everything graphsel-specific is removed, so that the artefact references torch only:
``gm.meta`` (pass history, masks, example inputs) is dropped, the tracer class is forgotten,
graphsel helper modules that only hold tensors (e.g. Materialize's gather indices) become plain
``nn.Module`` containers of the same parameters and buffers, and graphsel modules with their own
``forward`` (selective or dynamic-group convolutions still in the graph) are inlined by tracing
their forward. When that is impossible, the pickle holds ``torch.export``'s module of the model
instead (a warning says so). The written pickle is scanned with :mod:`pickletools`; any
remaining reference to graphsel is an :class:`ExportError`.

After writing, the artefact is loaded back (onnxruntime for ONNX) and run on the example
inputs; the largest absolute difference to the in-process model is returned in
:class:`ExportResult` and an :class:`ExportError` is raised when it exceeds the tolerance.
"""
from __future__ import annotations

import copy
import difflib
import io
import os
import pickletools
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from graphsel.errors import ExampleInputError, GraphselError
from graphsel.pipeline.verify import flatten_outputs

FORMATS = ("pt2", "onnx", "torchscript", "pickle")        # artefacts that load without graphsel
COMPILED_FORMATS = ("aoti",)                               # ... and need a C++ compiler to write
GRAPHSEL_FORMAT = "graphsel"                               # graphsel's checkpoint (graphsel.save)
SUFFIXES = {"pt2": ".pt2", "onnx": ".onnx", "torchscript": ".torchscript.pt", "pickle": ".pt",
            "aoti": ".aoti.pt2", GRAPHSEL_FORMAT: ".graphsel"}
LOADERS = {
    "pt2": "torch.export.load(path).module()",
    "onnx": "onnxruntime.InferenceSession(path)",
    "torchscript": "torch.jit.load(path)",
    "pickle": "torch.load(path, weights_only=False)",
    "aoti": "torch._inductor.aoti_load_package(path)",
    GRAPHSEL_FORMAT: "graphsel.load_model(path)",
}
# error allowed = atol + rtol * max|reference| (ONNX Runtime picks its own convolution algorithms)
TOLERANCE = {"pt2": (1e-4, 1e-5), "torchscript": (1e-4, 1e-5), "pickle": (1e-4, 1e-5), "onnx": (1e-3, 1e-4),
             "aoti": (1e-3, 1e-4),
             GRAPHSEL_FORMAT: (0.0, 0.0)}
_GRAPHSEL_PREFIXES = ("graphsel",)


class ExportError(GraphselError):
    """The model could not be exported, or the artefact does not reproduce the model."""


@dataclass
class ExportResult:
    """What :func:`export` wrote.

    ``path``: the artefact; ``files``: every file written (ONNX may add an external-data file);
    ``format``; ``seconds`` (export + check); ``max_abs_error``: largest absolute difference between
    the reloaded artefact and the in-process model on the example inputs (None when not checked);
    ``tolerance``: the allowed error; ``checked_with``: how the artefact was loaded for the check;
    ``load``: how to load it; ``method``: the exporter that produced it; ``warnings``.
    """

    path: Path
    format: str
    seconds: float
    max_abs_error: float | None = None
    tolerance: float | None = None
    checked_with: str | None = None
    method: str = ""
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def load(self) -> str:
        return LOADERS[self.format]

    def __str__(self) -> str:
        dev = "not checked" if self.max_abs_error is None else \
            f"max abs error {self.max_abs_error:.2e} (≤ {self.tolerance:.1e}, {self.checked_with})"
        return f"{self.format}: {self.path} ({self.method}; {self.seconds:.1f} s; {dev})"

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "seconds": round(self.seconds, 3),
                "max_abs_error": self.max_abs_error, "tolerance": self.tolerance, "checked_with": self.checked_with,
                "method": self.method, "files": [str(f) for f in self.files], "warnings": list(self.warnings),
                "load": self.load}


# ================================================================================================
# entry point

def export(gm: nn.Module, path: str | os.PathLike, format: str = "pt2", example_inputs: Any = None, *,
           check: bool = True, rtol: float | None = None, atol: float | None = None) -> ExportResult:
    """Write ``gm`` (a graphsel GraphModule or any ``nn.Module``) to ``path`` in ``format``.

    ``example_inputs`` (a tensor or a tuple of tensors) default to the inputs recorded when the
    graph was traced. ``path`` may be a directory (the file is then ``model`` + the format's
    suffix). To deploy on the fastest runtime here, pass the format
    :func:`graphsel.benchmark_runtimes` names: ``export(gm, path, table.export_format)``. ``check``: load the artefact back, run it on the example inputs and raise
    :class:`ExportError` when its outputs differ from ``gm``'s by more than
    ``atol + rtol * max|output|`` (defaults per format in ``TOLERANCE``).
    """
    if not isinstance(gm, nn.Module):
        raise TypeError(f"graphsel.export expects a torch.nn.Module or GraphModule, got {type(gm).__name__}")
    known = FORMATS + COMPILED_FORMATS + (GRAPHSEL_FORMAT,)
    if format not in known:
        close = difflib.get_close_matches(str(format), known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown export format {format!r}.{hint} Formats: {', '.join(known)}.")
    inputs = _inputs_for(gm, example_inputs, format)
    out = _target_path(path, format)
    out.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    result = ExportResult(path=out, format=format, seconds=0.0)
    if format == GRAPHSEL_FORMAT:
        _write_graphsel(gm, out, result)
    else:
        model = copy.deepcopy(gm).eval()
        writer = {"pt2": _write_pt2, "onnx": _write_onnx, "torchscript": _write_torchscript,
                  "pickle": _write_pickle, "aoti": _write_aoti}
        writer[format](model, inputs, out, result)
    result.files = _written_files(out)
    if check and inputs is not None:
        _check(gm, inputs, result, rtol, atol)
    result.seconds = time.perf_counter() - t0
    for w in result.warnings:
        warnings.warn(f"graphsel.export({format}): {w}", stacklevel=2)
    return result


def _inputs_for(gm: nn.Module, example_inputs: Any, format: str) -> tuple | None:
    from graphsel.ir.tracing import as_tuple, example_inputs_of

    inputs = as_tuple(example_inputs)
    if inputs is None and isinstance(gm, fx.GraphModule):
        inputs = example_inputs_of(gm)
    if inputs is None and format not in ("pickle", GRAPHSEL_FORMAT):
        raise ExampleInputError(
            f"graphsel.export({format!r}) needs example inputs: this model carries none (it was not traced by "
            f"graphsel); pass example_inputs=(torch.randn(1, 3, 224, 224),) or similar.")
    if inputs is not None:
        for i, t in enumerate(inputs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"example_inputs[{i}] is a {type(t).__name__}; export needs tensors")
    return inputs


def _target_path(path: str | os.PathLike, format: str) -> Path:
    p = Path(path)
    if p.is_dir() or str(path).endswith(os.sep):
        return p / f"model{SUFFIXES[format]}"
    return p


def _written_files(out: Path) -> list[Path]:
    extra = [f for f in out.parent.glob(out.name + "*") if f != out and f.is_file()]
    return [out] + sorted(extra) if out.exists() else sorted(extra)


# ================================================================================================
# removing graphsel from a model

def _is_graphsel_class(obj: Any) -> bool:
    mod = getattr(obj, "__module__", "") or ""
    return mod.split(".")[0] in _GRAPHSEL_PREFIXES


def _has_own_forward(m: nn.Module) -> bool:
    return type(m).forward is not nn.Module.forward


def _plain_container(m: nn.Module) -> nn.Module:
    """A ``torch.nn.Module`` holding ``m``'s parameters, buffers (persistence kept) and children."""
    plain = nn.Module()
    for name, p in m.named_parameters(recurse=False):
        plain.register_parameter(name, p)
    non_persistent = getattr(m, "_non_persistent_buffers_set", set())
    for name, b in m.named_buffers(recurse=False):
        plain.register_buffer(name, b, persistent=name not in non_persistent)
    for name, child in m.named_children():
        plain.add_module(name, child)
    plain.train(m.training)
    return plain


class _NeedsTorchExport(Exception):
    """A graphsel piece cannot be turned into plain torch.fx code."""


def _inline(m: nn.Module, path: str) -> fx.GraphModule:
    """``m``'s forward traced with torch.fx's default tracer (torch.nn leaves only)."""
    try:
        with torch.no_grad():
            traced = fx.symbolic_trace(m)
    except Exception as e:  # noqa: BLE001
        raise _NeedsTorchExport(f"module '{path}' ({type(m).__qualname__}) cannot be traced: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    traced.train(m.training)
    return traced


def _strip_modules(root: nn.Module, prefix: str = "") -> None:
    """Replace graphsel modules below ``root`` (in place) by plain torch modules."""
    for name, child in list(root.named_children()):
        path = f"{prefix}{name}"
        if _is_graphsel_class(type(child)):
            if _has_own_forward(child):
                child = _inline(child, path)
            else:
                child = _plain_container(child)
            setattr(root, name, child)
        _strip_modules(child, path + ".")


def _graphsel_functions(gm: fx.GraphModule) -> list[str]:
    return [f"{n.name} calls {getattr(n.target, '__module__', '')}.{getattr(n.target, '__qualname__', n.target)}"
            for n in gm.graph.nodes if n.op == "call_function" and _is_graphsel_class(n.target)]


def plain_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` that references torch only: no ``meta``, no tracer class, no graphsel
    modules (holders become ``nn.Module`` containers, modules with a forward are inlined).
    Raises :class:`ExportError` when a graphsel function or an untraceable graphsel module remains."""
    work = copy.deepcopy(gm)
    try:
        _strip_modules(work)
    except _NeedsTorchExport as e:
        raise ExportError(str(e)) from e
    graph = work.graph
    bad = _graphsel_functions(work)
    if bad:
        raise ExportError("the graph calls graphsel functions, which a plain pickle cannot hold: " + "; ".join(bad))
    graph._tracer_cls = None
    graph._tracer_extras = {}
    plain = fx.GraphModule(work, graph, class_name=type(gm).__name__ if "<locals>" not in type(gm).__qualname__
                           else "GraphModule")
    plain.meta = {}
    plain._tracer_cls = None
    plain._tracer_extras = {}
    plain.train(gm.training)
    return plain


# ================================================================================================
# writers

def _write_graphsel(gm: nn.Module, out: Path, result: ExportResult) -> None:
    from graphsel.tools.checkpoint import save_checkpoint

    save_checkpoint(gm, out)
    result.method = "graphsel.save"


def _write_pt2(model: nn.Module, inputs: tuple, out: Path, result: ExportResult) -> None:
    ep = _torch_export(model, inputs)
    torch.export.save(ep, str(out))
    result.method = "torch.export"


def _write_aoti(model: nn.Module, inputs: tuple, out: Path, result: ExportResult) -> None:
    from graphsel.analysis.latency import runtime_unavailable

    why = runtime_unavailable("aoti")
    if why:
        raise ExportError(f"format 'aoti' needs AOTInductor: {why}")
    import torch._inductor as inductor

    ep = _torch_export(model, inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inductor.aoti_compile_and_package(ep, package_path=str(out))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"AOTInductor compilation failed: {type(e).__name__}: {_first_line(e)}") from e
    result.method = "torch.export + torch._inductor.aoti_compile_and_package"


def _torch_export(model: nn.Module, inputs: tuple):
    try:
        with torch.no_grad():
            return torch.export.export(model, tuple(inputs))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"torch.export.export failed: {type(e).__name__}: {_first_line(e)}") from e


def _write_onnx(model: nn.Module, inputs: tuple, out: Path, result: ExportResult) -> None:
    import contextlib

    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, tuple(inputs), dynamo=True, external_data=False, verbose=False,
                                        optimize=True)
            program.save(str(out))
        result.method = "torch.onnx.export(dynamo=True)"
        return
    except Exception as e:  # noqa: BLE001
        reason = f"{type(e).__name__}: {_first_line(e)}"
    result.warnings.append(f"the dynamo ONNX exporter failed ({reason}); used the legacy TorchScript exporter")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, tuple(inputs), str(out), dynamo=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"ONNX export failed with both exporters: dynamo: {reason}; legacy: "
                          f"{type(e).__name__}: {_first_line(e)}") from e
    result.method = "torch.onnx.export(dynamo=False)"


def _write_torchscript(model: nn.Module, inputs: tuple, out: Path, result: ExportResult) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.script(model)
        result.method = "torch.jit.script"
    except Exception as e:  # noqa: BLE001
        result.warnings.append(f"torch.jit.script failed ({type(e).__name__}: {_first_line(e)}); used torch.jit.trace, "
                               f"which records the path taken by the example inputs")
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scripted = torch.jit.trace(model, tuple(inputs))
        except Exception as e2:  # noqa: BLE001
            raise ExportError(f"TorchScript export failed: script: {_first_line(e)}; trace: {_first_line(e2)}") from e2
        result.method = "torch.jit.trace"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, str(out))


def _write_pickle(model: nn.Module, inputs: tuple | None, out: Path, result: ExportResult) -> None:
    """A plain GraphModule (graphsel stripped) when possible, else torch.export's module of the model."""
    reason = ""
    try:
        plain = plain_graph_module(model) if isinstance(model, fx.GraphModule) else model
        data = _pickled(plain)
        refs = graphsel_references(data)
        if not refs:
            out.write_bytes(data)
            result.method = "torch.save(GraphModule)" if isinstance(plain, fx.GraphModule) else "torch.save(module)"
            return
        reason = f"the model references graphsel ({', '.join(sorted(refs)[:6])})"
    except ExportError as e:
        reason = str(e)
    except Exception as e:  # noqa: BLE001 - e.g. modules holding lambdas cannot be pickled
        reason = f"the model cannot be pickled as is ({type(e).__name__}: {_first_line(e)})"
    if inputs is None:
        raise ExportError(f"{reason}; pass example_inputs= so that export can convert it with torch.export")
    result.warnings.append(f"{reason}; pickled torch.export's module of it instead")
    data = _pickled(_exported_graph_module(model, inputs))
    refs = graphsel_references(data)
    if refs:
        raise ExportError(f"the pickled model still references graphsel: {', '.join(sorted(refs))}; "
                          f"use format='pt2' or 'onnx'")
    out.write_bytes(data)
    result.method = "torch.save(torch.export module)"


def _exported_graph_module(model: nn.Module, inputs: tuple) -> fx.GraphModule:
    """torch.export's module of ``model`` as a plain, picklable GraphModule of aten ops (the
    input-guard submodule torch.export adds, which holds a closure, is dropped)."""
    unlifted = _torch_export(model, inputs).module()
    graph = unlifted.graph
    for n in list(graph.nodes):
        if n.op == "call_module" and not n.users and \
                type(unlifted.get_submodule(n.target)).__module__.startswith("torch.export"):
            graph.erase_node(n)
    return plain_graph_module(fx.GraphModule(unlifted, graph, class_name="ExportedModule"))


def _pickled(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model, buf)
    return buf.getvalue()


def graphsel_references(data: bytes | str | os.PathLike) -> set[str]:
    """Globals and strings naming graphsel in a ``torch.save`` file (bytes or a path):
    what unpickling would try to import from graphsel."""
    if not isinstance(data, bytes):
        data = Path(data).read_bytes()
    refs: set[str] = set()
    for pkl in _pickles_in(data):
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(pkl):
            if op.name == "GLOBAL" and _names_graphsel(str(arg).split(" ")[0]):
                refs.add(str(arg))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2 and _names_graphsel(strings[-2]):
                refs.add(f"{strings[-2]} {strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
        # import statements in pickled source code (a GraphModule's code)
        for s in strings:
            for line in s.splitlines():
                if line.strip().startswith(("import graphsel", "from graphsel")):
                    refs.add(line.strip())
    return refs


def _names_graphsel(module: str) -> bool:
    return module.split(".")[0] in _GRAPHSEL_PREFIXES


def _pickles_in(data: bytes) -> Iterable[bytes]:
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for name in z.namelist():
                if name.endswith(".pkl"):
                    yield z.read(name)
    else:
        yield data


# ================================================================================================
# checking the artefact

def _run_artefact(result: ExportResult, inputs: tuple) -> list[torch.Tensor]:
    path = str(result.path)
    if result.format == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ExportError("checking an ONNX export needs onnxruntime: pip install onnxruntime "
                              "(or pass check=False)") from e
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting threads
        sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
        result.checked_with = "onnxruntime"
        return [torch.from_numpy(o) for o in sess.run(None, feed)]
    if result.format == GRAPHSEL_FORMAT:
        from graphsel.tools.checkpoint import load_checkpoint

        loaded = load_checkpoint(path, propagate=False)
        loaded.eval()
        result.checked_with = "graphsel.load_model"
    elif result.format == "pt2":
        loaded = torch.export.load(path).module()
        result.checked_with = "torch.export.load"
    elif result.format == "aoti":
        import torch._inductor as inductor

        runner = inductor.aoti_load_package(path)
        result.checked_with = "torch._inductor.aoti_load_package"
        with torch.inference_mode():
            return flatten_outputs(runner(*inputs))
    elif result.format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            loaded = torch.jit.load(path)
        result.checked_with = "torch.jit.load"
    else:
        loaded = torch.load(path, weights_only=False)
        loaded.eval()
        result.checked_with = "torch.load"
    with torch.no_grad():
        return flatten_outputs(loaded(*inputs))


def _check(gm: nn.Module, inputs: tuple, result: ExportResult, rtol: float | None, atol: float | None) -> None:
    from graphsel.pipeline.verify import eval_mode

    with eval_mode(gm), torch.no_grad():
        ref = [t.detach().float().cpu() for t in flatten_outputs(gm(*inputs))]
    try:
        got = [t.detach().float().cpu() for t in _run_artefact(result, inputs)]
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"the {result.format} artefact {result.path} was written but fails to run: "
                          f"{type(e).__name__}: {_first_line(e)}") from e
    if len(got) != len(ref) or any(a.shape != b.shape for a, b in zip(got, ref)):
        raise ExportError(f"the {result.format} artefact returns {[tuple(t.shape) for t in got]}, the model "
                          f"{[tuple(t.shape) for t in ref]}")
    d_rtol, d_atol = TOLERANCE[result.format]
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    scale = max((float(t.abs().max()) for t in ref if t.numel()), default=0.0)
    err = max((float((a - b).abs().max()) for a, b in zip(got, ref) if a.numel()), default=0.0)
    result.max_abs_error = err
    result.tolerance = atol + rtol * scale
    if not err <= result.tolerance:
        raise ExportError(f"the {result.format} artefact {result.path} differs from the model: max abs error "
                          f"{err:.3g} > tolerance {result.tolerance:.3g} (checked with {result.checked_with})")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__
