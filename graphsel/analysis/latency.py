"""Latency on a deployment runtime: whole models, single conv/linear layers, and the per-layer
latency tables that latency-aware pruning (``prune(target_latency=..., runtime=...)``) reads.

Runtimes (:data:`RUNTIMES`):

* ``"eager"``: the model itself under ``torch.inference_mode``;
* ``"inductor"``: ``torch.compile(model)`` (on CPU it compiles C++: needs a compiler);
* ``"aoti"``: AOTInductor, ``torch.export`` then ``torch._inductor.aoti_compile_and_package`` and
  ``aoti_load_package`` (needs a C++ compiler);
* ``"onnxruntime"``: ``torch.onnx.export`` (the dynamo exporter with its optimiser, the legacy
  exporter when that fails) and an onnxruntime CPU session with every graph optimisation.

:func:`prepare_runtime` turns a model into a :class:`RuntimeRunner` (one call = one inference on
fixed inputs; export / compile time kept apart), :func:`time_runners` times runners interleaved
(same process, same threads; warm-up, one untimed *settling* call before every timed call so
that the previous candidate's worker threads, which OpenMP keeps spinning for a while after a
call, do not run into the timed one; medians and quartiles; onnxruntime sessions do not spin,
see :func:`ort_session`) and :func:`measure_model` times one model.

**Layer tables** (:class:`LatencyTable`): the latency of one conv or linear layer of a given
:class:`LayerShape` (input shape, kernel, stride, padding, dilation, groups, bias and the two
channel widths), measured once on the runtime and cached on disk as JSON keyed by machine (CPU
model, architecture, core count), runtime, torch / onnxruntime versions, thread count and dtype:
``<cache_dir>/<runtime>-<key digest>.json`` with ``cache_dir`` the argument, else
``$GRAPHSEL_CACHE_DIR/latency``, else ``~/.cache/graphsel/latency``. A key that differs in any
field is another file: the layers are measured again. Layers are timed eagerly for ``eager``,
``inductor`` and ``aoti`` (on CPU inductor calls the same ATen / oneDNN convolution and GEMM
kernels and fuses the element-wise ops around them, which a per-layer table cannot see; the
end-to-end measurement that latency-aware pruning corrects with does), and as a one-node ONNX
graph in onnxruntime for ``onnxruntime``. torch's compiler, onnx and onnxruntime are imported
only when used.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from graphsel.errors import GraphselError

RUNTIMES = ("eager", "inductor", "aoti", "onnxruntime")
#: the runtime a layer table of each runtime is measured on (see the module docstring)
LAYER_RUNTIME = {"eager": "eager", "inductor": "eager", "aoti": "eager", "onnxruntime": "onnxruntime"}
TABLE_FORMAT = 1


class RuntimeUnavailable(GraphselError):
    """The runtime cannot run here (no C++ compiler, onnxruntime not installed, export failed)."""

    def __init__(self, runtime: str, reason: str):
        self.runtime = runtime
        self.reason = reason
        super().__init__(f"runtime '{runtime}' is unavailable: {reason}")


def check_runtime_name(runtime: Any) -> str:
    if runtime not in RUNTIMES:
        import difflib
        close = difflib.get_close_matches(str(runtime), RUNTIMES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown runtime {runtime!r}.{hint} Runtimes: {', '.join(RUNTIMES)}.")
    return runtime


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on CPU (``$CXX``, g++, clang++, c++), or None."""
    for name in filter(None, (os.environ.get("CXX"), "g++", "clang++", "c++")):
        path = shutil.which(name)
        if path:
            return path
    return None


def runtime_unavailable(runtime: str) -> str | None:
    """Why ``runtime`` cannot run here, or None when it can (cheap: nothing is compiled)."""
    check_runtime_name(runtime)
    if runtime in ("inductor", "aoti"):
        if cxx_compiler() is None:
            return "no C++ compiler found (inductor compiles C++ on CPU): install g++ or clang++, or set CXX"
        if runtime == "aoti":
            import torch._inductor as inductor
            if not hasattr(inductor, "aoti_compile_and_package"):
                return f"torch {torch.__version__} has no torch._inductor.aoti_compile_and_package"
    if runtime == "onnxruntime":
        for mod in ("onnx", "onnxruntime"):
            try:
                __import__(mod)
            except ImportError:
                return f"{mod} is not installed: pip install onnx onnxruntime"
    return None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0][:240]}" if s else type(e).__name__


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Use ``threads`` intra-op threads in torch inside the block (None: leave as is)."""
    old = torch.get_num_threads()
    if threads is not None and threads != old:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in _outputs(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _outputs(o)]
    return []


# ================================================================================================
# whole models on a runtime

@dataclass
class RuntimeRunner:
    """One inference of a prepared model per call of ``run``; ``compile_seconds``: export and
    compilation (first call included for ``inductor``); ``outputs``: the outputs of the first
    call (for a correctness check); ``method``: how it was built."""
    runtime: str
    run: Callable[[], Any]
    compile_seconds: float
    outputs: list[torch.Tensor]
    method: str = ""
    threads: int = 1
    keep: list = field(default_factory=list, repr=False)    # objects the runner needs alive (temp dirs)


def prepare_runtime(model: nn.Module, inputs: tuple, runtime: str, *, threads: int | None = None,
                    workdir: str | os.PathLike | None = None) -> RuntimeRunner:
    """``model`` (copied, eval mode) ready to run on ``inputs`` in ``runtime``. Raises
    :class:`RuntimeUnavailable` with the reason when the runtime cannot run here or the model
    cannot be exported / compiled for it."""
    check_runtime_name(runtime)
    why = runtime_unavailable(runtime)
    if why:
        raise RuntimeUnavailable(runtime, why)
    inputs = tuple(inputs)
    threads = threads or torch.get_num_threads()
    with torch.no_grad():
        m = copy.deepcopy(model).eval()
    t0 = time.perf_counter()
    keep: list = []
    try:
        with torch_threads(threads):
            if runtime == "eager":
                def run(m=m):
                    with torch.inference_mode():
                        return m(*inputs)
                method = "eager (torch.inference_mode)"
            elif runtime == "inductor":
                compiled = torch.compile(m, dynamic=False)

                def run(c=compiled):
                    with torch.inference_mode():
                        return c(*inputs)
                method = "torch.compile (inductor, default mode)"
            elif runtime == "aoti":
                run, method, tmp = _aoti_runner(m, inputs, workdir)
                keep.append(tmp)
            else:
                run, method, tmp = _ort_runner(m, inputs, threads, workdir)
                keep.append(tmp)
            outputs = [t.detach().float().cpu() for t in _outputs(run())]
    except RuntimeUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - the reason goes into the table
        raise RuntimeUnavailable(runtime, f"preparing the model failed: {_first_line(e)}") from e
    return RuntimeRunner(runtime, run, time.perf_counter() - t0, outputs, method, threads, keep)


def _aoti_runner(m: nn.Module, inputs: tuple, workdir):
    import torch._inductor as inductor

    tmp = tempfile.TemporaryDirectory(prefix="graphsel-aoti-", dir=workdir)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(m, inputs)
        path = inductor.aoti_compile_and_package(ep, package_path=os.path.join(tmp.name, "model.pt2"))
    loaded = inductor.aoti_load_package(path)

    def run(r=loaded):
        with torch.inference_mode():
            return r(*inputs)
    return run, "torch.export + AOTInductor package", tmp


def export_onnx(model: nn.Module, inputs: tuple, path: str | os.PathLike) -> str:
    """Write ``model`` as ONNX with ``torch.onnx.export``: the dynamo exporter with its optimiser
    (what :func:`graphsel.export` uses), the legacy TorchScript exporter when that fails.
    Returns which exporter wrote it."""
    quiet = contextlib.redirect_stdout(io.StringIO())
    try:
        with quiet, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, tuple(inputs), dynamo=True, external_data=False, verbose=False,
                                        optimize=True)
            program.save(str(path))
        return "torch.onnx.export(dynamo=True)"
    except Exception as e:  # noqa: BLE001
        reason = _first_line(e)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, tuple(inputs), str(path), dynamo=False)
    except Exception as e:  # noqa: BLE001
        raise RuntimeUnavailable("onnxruntime", f"ONNX export failed: dynamo: {reason}; legacy: {_first_line(e)}") from e
    return f"torch.onnx.export(dynamo=False) (dynamo failed: {reason[:120]})"


def ort_session(path: str | os.PathLike | bytes, threads: int, *, spinning: bool = False, level: str = "all",
                save_to: str | os.PathLike | None = None):
    """An onnxruntime CPU session: ``threads`` intra-op threads, one inter-op thread, graph
    optimisation ``level`` (``"disable"``, ``"basic"``, ``"extended"``, ``"all"``); ``spinning``:
    whether idle worker threads busy-wait for the next call. onnxruntime spins by default; here it
    does not, because timings interleave several sessions (and torch's threads) on the same cores,
    and a session whose workers still spin takes the cores of the next one: on 2 cores single
    batch-1 calls then take 10–20× longer at random (``benchmarks/ort_gap``). A single deployed
    session may gain a little from spinning."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if save_to is not None:                      # the graph after optimisation, to inspect
        so.optimized_model_filepath = str(save_to)
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so,
                                providers=["CPUExecutionProvider"])


def _ort_runner(m: nn.Module, inputs: tuple, threads: int, workdir):
    tmp = tempfile.TemporaryDirectory(prefix="graphsel-ort-", dir=workdir)
    path = os.path.join(tmp.name, "model.onnx")
    method = export_onnx(m, inputs, path)
    sess = ort_session(path, threads)
    names = [i.name for i in sess.get_inputs()]
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}

    def run(s=sess, feed=feed):
        return [torch.from_numpy(o) for o in s.run(None, feed)]
    return run, f"{method} + onnxruntime (CPU, ORT_ENABLE_ALL, no spinning)", tmp


@dataclass
class Timing:
    """Milliseconds per call: median, quartiles, minimum and the samples."""
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    samples_ms: list[float]

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Timing":
        s = sorted(samples)
        if len(s) >= 4:
            q1, _, q3 = statistics.quantiles(s, n=4)
        else:
            q1, q3 = s[0], s[-1]
        return cls(statistics.median(s), q1, q3, s[0], [round(x, 4) for x in samples])


def time_runners(runners: dict[str, Callable[[], Any]], *, repeats: int = 30, warmup: int = 3, settle: int = 1,
                 threads: int | None = None, progress: bool | None = False, desc: str = "timing") -> dict[str, Timing]:
    """Time every runner ``repeats`` times, interleaved round by round, after ``warmup`` calls
    each; before every timed call the runner is called ``settle`` times untimed (see the module
    docstring). Same process, same torch threads (``threads``) for all."""
    from tqdm.auto import tqdm

    samples: dict[str, list[float]] = {k: [] for k in runners}
    with torch_threads(threads), torch.inference_mode():
        for fn in runners.values():
            for _ in range(warmup):
                fn()
        for _ in tqdm(range(max(1, repeats)), desc=desc, leave=False, disable=not progress if progress is not None
                      else None, file=sys.stderr):
            for k, fn in runners.items():
                for _ in range(settle):
                    fn()
                t0 = time.perf_counter()
                fn()
                samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: Timing.of(v) for k, v in samples.items()}


@dataclass
class ModelTiming:
    runtime: str
    timing: Timing
    compile_seconds: float
    method: str

    @property
    def median_ms(self) -> float:
        return self.timing.median_ms


def measure_model(model: nn.Module, inputs: tuple, runtime: str = "eager", *, threads: int | None = None,
                  repeats: int = 20, warmup: int = 3) -> ModelTiming:
    """Median latency of ``model(*inputs)`` on ``runtime`` (export / compile time apart)."""
    runner = prepare_runtime(model, inputs, runtime, threads=threads)
    t = time_runners({runtime: runner.run}, repeats=repeats, warmup=warmup, settle=0, threads=runner.threads)
    return ModelTiming(runtime, t[runtime], runner.compile_seconds, runner.method)


# ================================================================================================
# single layers

@dataclass(frozen=True)
class LayerShape:
    """One conv (any dimension) or linear layer as a latency table sees it: ``input_shape`` is the
    full input (channels at dim 1 for a conv, last for a linear layer), ``in_channels`` /
    ``out_channels`` its widths; ``depthwise``: a conv with groups = in = out channels (its
    widths move together)."""
    op: str
    in_channels: int
    out_channels: int
    input_shape: tuple[int, ...]
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True
    depthwise: bool = False

    @classmethod
    def of_module(cls, m: nn.Module, input_shape: Sequence[int]) -> "LayerShape":
        if isinstance(m, nn.Linear):
            return cls("linear", m.in_features, m.out_features, tuple(int(s) for s in input_shape),
                       bias=m.bias is not None)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            pad = m.padding if isinstance(m.padding, str) else tuple(m.padding)
            return cls("conv", m.in_channels, m.out_channels, tuple(int(s) for s in input_shape), tuple(m.kernel_size),
                       tuple(m.stride), pad, tuple(m.dilation), m.groups, m.bias is not None,
                       depthwise=m.groups > 1 and m.groups == m.in_channels == m.out_channels)
        raise TypeError(f"no latency table for {type(m).__name__}: only Conv1d/2d/3d and Linear")

    def resized(self, in_channels: int, out_channels: int) -> "LayerShape":
        """The same layer at other widths (a depthwise conv: ``in_channels`` for both)."""
        shape = list(self.input_shape)
        if self.depthwise:
            out_channels = in_channels
        shape[1 if self.op == "conv" else -1] = in_channels
        groups = in_channels if self.depthwise else self.groups
        return LayerShape(self.op, in_channels, out_channels, tuple(shape), self.kernel, self.stride, self.padding,
                          self.dilation, groups, self.bias, self.depthwise)

    def with_batch(self, batch: int | None) -> "LayerShape":
        if batch is None or not self.input_shape:
            return self
        return LayerShape(self.op, self.in_channels, self.out_channels, (int(batch),) + self.input_shape[1:],
                          self.kernel, self.stride, self.padding, self.dilation, self.groups, self.bias,
                          self.depthwise)

    def key(self) -> str:
        x = "x".join(map(str, self.input_shape))
        if self.op == "linear":
            return f"linear|in{self.in_channels}|out{self.out_channels}|x{x}|b{int(self.bias)}"
        pad = self.padding if isinstance(self.padding, str) else "x".join(map(str, self.padding))
        return (f"conv{len(self.kernel)}d|in{self.in_channels}|out{self.out_channels}|x{x}|"
                f"k{'x'.join(map(str, self.kernel))}|s{'x'.join(map(str, self.stride))}|p{pad}|"
                f"d{'x'.join(map(str, self.dilation))}|g{self.groups}|b{int(self.bias)}")

    def module(self) -> nn.Module:
        if self.op == "linear":
            return nn.Linear(self.in_channels, self.out_channels, bias=self.bias)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(self.kernel)]
        return conv(self.in_channels, self.out_channels, self.kernel, self.stride, self.padding, self.dilation,
                    self.groups, self.bias)


def _sample_until(fn: Callable[[], Any], *, warmup: int, min_reps: int, max_reps: int, min_ms: float) -> float:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    total = 0.0
    while len(times) < max_reps and (len(times) < min_reps or total < min_ms):
        t0 = time.perf_counter()
        fn()
        dt = (time.perf_counter() - t0) * 1e3
        times.append(dt)
        total += dt
    return statistics.median(times)


def time_layer_eager(shape: LayerShape, *, threads: int | None = None, warmup: int = 2, min_reps: int = 5,
                     max_reps: int = 50, min_ms: float = 10.0) -> float:
    """Median milliseconds of one eager call of the layer on random data."""
    g = torch.Generator().manual_seed(0)
    with torch_threads(threads), torch.inference_mode():
        m = shape.module().eval()
        x = torch.randn(shape.input_shape, generator=g)
        return _sample_until(lambda: m(x), warmup=warmup, min_reps=min_reps, max_reps=max_reps, min_ms=min_ms)


def layer_onnx(shape: LayerShape) -> bytes:
    """A one-node ONNX model of the layer (Conv, Gemm, or MatMul + Add), random weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape.input_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits, nodes = [], []
    if shape.op == "conv":
        w = rng.standard_normal((shape.out_channels, shape.in_channels // shape.groups) + shape.kernel).astype("float32")
        inits.append(numpy_helper.from_array(w, "w"))
        ins = ["x", "w"]
        if shape.bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(shape.out_channels).astype("float32"), "b"))
            ins.append("b")
        attrs: dict[str, Any] = dict(kernel_shape=list(shape.kernel), strides=list(shape.stride),
                                     dilations=list(shape.dilation), group=shape.groups)
        if isinstance(shape.padding, str):
            if shape.padding == "same":
                attrs["auto_pad"] = "SAME_UPPER"
            else:
                attrs["pads"] = [0] * (2 * len(shape.kernel))
        else:
            attrs["pads"] = list(shape.padding) * 2
        nodes.append(helper.make_node("Conv", ins, ["y"], **attrs))
    else:
        w = rng.standard_normal((shape.out_channels, shape.in_channels)).astype("float32")
        if len(shape.input_shape) == 2:
            inits.append(numpy_helper.from_array(w, "w"))
            ins = ["x", "w"]
            if shape.bias:
                inits.append(numpy_helper.from_array(rng.standard_normal(shape.out_channels).astype("float32"), "b"))
                ins.append("b")
            nodes.append(helper.make_node("Gemm", ins, ["y"], transB=1))
        else:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "wt"))
            out = "y" if not shape.bias else "xw"
            nodes.append(helper.make_node("MatMul", ["x", "wt"], [out]))
            if shape.bias:
                inits.append(numpy_helper.from_array(rng.standard_normal(shape.out_channels).astype("float32"), "b"))
                nodes.append(helper.make_node("Add", ["xw", "b"], ["y"]))
    graph = helper.make_graph(nodes, "layer", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def time_layer_onnxruntime(shape: LayerShape, *, threads: int | None = None, warmup: int = 2, min_reps: int = 5,
                           max_reps: int = 50, min_ms: float = 10.0) -> float:
    """Median milliseconds of one onnxruntime call of the layer as a one-node ONNX graph."""
    import numpy as np

    sess = ort_session(layer_onnx(shape), threads or torch.get_num_threads())
    feed = {"x": np.random.default_rng(1).standard_normal(shape.input_shape).astype("float32")}
    return _sample_until(lambda: sess.run(None, feed), warmup=warmup, min_reps=min_reps, max_reps=max_reps,
                         min_ms=min_ms)


LAYER_TIMERS: dict[str, Callable[..., float]] = {"eager": time_layer_eager, "onnxruntime": time_layer_onnxruntime}


# ================================================================================================
# the table and its cache

def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_cache_dir() -> Path:
    env = os.environ.get("GRAPHSEL_CACHE_DIR")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "graphsel"
    return base / "latency"


class LatencyTable:
    """Per-layer latencies on one runtime, measured on demand and cached on disk (module docstring).

    ``runtime``: one of :data:`RUNTIMES`. ``threads``: intra-op threads for torch and onnxruntime
    (default: torch's current setting). ``batch``: the batch size latencies are measured at
    (default: the example inputs' batch, i.e. dim 0 of every input). ``cache_dir``: where the
    JSON tables live (default ``$GRAPHSEL_CACHE_DIR/latency`` or ``~/.cache/graphsel/latency``);
    ``cache=False`` keeps the table in memory. ``timer``: ``f(LayerShape) -> ms`` replacing the
    measurement (tests, simulators; its name becomes part of the cache key) and ``model_timer``:
    ``f(model, inputs) -> ms`` replacing the end-to-end measurement. ``progress``: show a tqdm
    bar while measuring (None: on terminals).
    """

    def __init__(self, runtime: str = "eager", *, threads: int | None = None, batch: int | None = None,
                 cache_dir: str | os.PathLike | None = None, cache: bool = True,
                 timer: Callable[[LayerShape], float] | None = None,
                 model_timer: Callable[[nn.Module, tuple], float] | None = None,
                 progress: bool | None = None, min_ms: float = 10.0, repeats: int = 20):
        self.runtime = check_runtime_name(runtime)
        if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
            raise ValueError(f"batch must be a positive integer (the batch size latencies are measured at), got {batch!r}")
        self.threads = int(threads or torch.get_num_threads())
        self.batch = batch
        self.timer = timer
        self.model_timer = model_timer
        self.progress = progress
        self.min_ms = min_ms
        self.repeats = repeats
        self.layer_runtime = LAYER_RUNTIME[runtime]
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.cache = cache
        self.key = self._key()
        digest = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = self.cache_dir / f"{self.layer_runtime}-{digest}.json"
        self.entries: dict[str, float] = {}
        self.hits = 0
        self.measured = 0
        self._dirty = False
        if cache:
            self._load()

    def __repr__(self) -> str:
        return (f"LatencyTable(runtime={self.runtime!r}, threads={self.threads}, batch={self.batch}, "
                f"{len(self.entries)} entries, {self.path if self.cache else 'in memory'})")

    # -- key and file ---------------------------------------------------------------------------
    def _key(self) -> dict[str, Any]:
        key = {"format": TABLE_FORMAT, "cpu": cpu_model(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
               "runtime": self.layer_runtime, "torch": torch.__version__, "threads": self.threads, "dtype": "float32"}
        if self.layer_runtime == "onnxruntime":
            key["onnxruntime"] = _version("onnxruntime")
        if self.timer is not None:
            key["timer"] = f"{getattr(self.timer, '__module__', '')}.{getattr(self.timer, '__qualname__', repr(self.timer))}"
        return key

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if data.get("key") == self.key:
            self.entries = {k: float(v) for k, v in data.get("entries", {}).items()}

    def save(self) -> None:
        """Write the table (atomically) when it has new entries."""
        if not self.cache or not self._dirty:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": self.key, "entries": self.entries}, indent=0, sort_keys=True))
        os.replace(tmp, self.path)
        self._dirty = False

    # -- layers ---------------------------------------------------------------------------------
    def _measure_one(self, shape: LayerShape) -> float:
        if self.timer is not None:
            return float(self.timer(shape))
        why = runtime_unavailable(self.layer_runtime)
        if why:
            raise RuntimeUnavailable(self.layer_runtime, why)
        return LAYER_TIMERS[self.layer_runtime](shape, threads=self.threads, min_ms=self.min_ms)

    def latency(self, shape: LayerShape) -> float:
        """Milliseconds of one layer (measured once, then read from the table)."""
        return self.measure([shape])[0]

    def measure(self, shapes: Iterable[LayerShape], desc: str | None = None) -> list[float]:
        """Milliseconds of every layer shape, measuring those not yet in the table (a tqdm bar
        shows the progress; the table is saved every few seconds and at the end)."""
        from tqdm.auto import tqdm

        shapes = list(shapes)
        keys = [s.key() for s in shapes]
        missing = list(dict.fromkeys(k for k in keys if k not in self.entries))
        self.hits += len(keys) - len(missing)
        if missing:
            by_key = dict(zip(keys, shapes))
            bar = tqdm(missing, desc=desc or f"latency table ({self.layer_runtime})", unit="layer", leave=False,
                       disable=(not self.progress) if self.progress is not None else None, file=sys.stderr)
            last_save = time.monotonic()
            try:
                for k in bar:
                    self.entries[k] = self._measure_one(by_key[k])
                    self.measured += 1
                    self._dirty = True
                    if time.monotonic() - last_save > 10:
                        self.save()
                        last_save = time.monotonic()
            finally:
                bar.close()
                self.save()
        return [self.entries[k] for k in keys]

    # -- whole models ---------------------------------------------------------------------------
    def inputs_at_batch(self, inputs: tuple) -> tuple:
        """``inputs`` with dim 0 set to ``batch`` (random data of the same dtype), or as they are."""
        if self.batch is None:
            return tuple(inputs)
        g = torch.Generator().manual_seed(0)
        out = []
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] != self.batch:
                shape = (self.batch,) + tuple(t.shape[1:])
                t = torch.randn(shape, generator=g, dtype=t.dtype) if t.is_floating_point() else \
                    t[:1].expand(shape).clone()
            out.append(t)
        return tuple(out)

    def measure_model(self, model: nn.Module, inputs: tuple) -> float:
        """Median milliseconds of ``model`` on this table's runtime, threads and batch."""
        return self.measure_models({"model": model}, inputs)["model"]

    def measure_models(self, models: dict[str, nn.Module], inputs: tuple,
                       prepared: dict[str, RuntimeRunner] | None = None) -> dict[str, float]:
        """Median milliseconds of each model on this table's runtime, threads and batch, timed
        interleaved in this process. ``prepared``: a dict the caller keeps across calls, holding
        the runners already built (by name: a model timed again is not exported or compiled again)."""
        inputs = self.inputs_at_batch(inputs)
        if self.model_timer is not None:
            return {k: float(self.model_timer(m, inputs)) for k, m in models.items()}
        prepared = {} if prepared is None else prepared
        for k, m in models.items():
            if k not in prepared:
                prepared[k] = prepare_runtime(m, inputs, self.runtime, threads=self.threads)
        t = time_runners({k: prepared[k].run for k in models}, repeats=self.repeats, warmup=3, settle=1,
                         threads=self.threads)
        return {k: v.median_ms for k, v in t.items()}

    def info(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "layer_runtime": self.layer_runtime, "threads": self.threads,
                "batch": self.batch, "path": str(self.path) if self.cache else None, "entries": len(self.entries),
                "measured_now": self.measured, "table_hits": self.hits}


def grid_widths(size: int, low: int | None = None, base: int = 8, max_points: int = 32) -> list[int]:
    """Candidate widths of a layer side or channel group of ``size``: multiples of a step (``base``
    times a power of two, so that at most about ``max_points`` remain) from ``low`` up, ``low``
    itself when it lies below the first multiple (the narrowest width reachable), and ``size``."""
    lo = max(1, low or 1)
    if size <= base:
        return list(range(lo, size + 1))
    step = base
    while size / step > max_points:
        step *= 2
    start = max(step, int(math.ceil(lo / step)) * step)
    out = list(range(start, size, step))
    if low is not None and lo < start:
        out.insert(0, lo)
    return out + [size]


def shape_dict(shape: LayerShape) -> dict[str, Any]:
    return asdict(shape)
