"""``graphsel.trace``: torch.fx symbolic tracing that never mutates the user's model and leafs
what it cannot trace.

* Traces a deep copy of the model (:func:`graphsel.ir.copying.deepcopy_module`, ``copy.deepcopy``'s
  result at a third of its cost; LeViT-style caches would otherwise capture proxies, and leaf
  modules would be shared with the user's model).
* ``proxy_buffer_attributes=True`` (in-place buffer updates are recorded, not executed) and
  ``param_shapes_constant=True`` (branches on parameter shapes are resolved).
* Only ``torch.nn`` modules (and classes registered with :func:`register_leaf_module`) are leaves.
* The graph has eval-mode semantics: the copy is traced with every module in eval mode, so code
  that reads ``self.training`` as a Python value (``F.dropout(x, p, self.training)``,
  ``if self.training:``) is specialised for inference, the mode graphsel verifies and deploys.
  The returned module then gets each module's own training flag back (torch.nn modules such as
  ``nn.Dropout`` and ``nn.BatchNorm2d`` still follow ``.train()``/``.eval()``); when a train-mode
  trace would differ, a note says so.
* Automatic leafing: when tracing fails inside a submodule, the innermost failing submodule
  becomes an opaque leaf and tracing is retried. Every leafed module is recorded in
  ``gm.meta["graphsel"].leafed`` and in the report; channels crossing it are frozen.
"""
from __future__ import annotations

import inspect
import os
import time
import traceback
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx._symbolic_trace import PHBase
from torch.fx.proxy import ParameterProxy

from graphsel.ir.copying import clone_memo, deepcopy_module
from graphsel.errors import ExampleInputError, TraceError
from graphsel.ir.graph import mark_compiled, module_index
from graphsel.ir.meta import GraphselMeta, LeafRecord, META_KEY
from graphsel.ir.shapes import propagate_shapes
from graphsel.ir.specialize import (SHIM_PREFIX, fixed_defaults, keep_output_type, make_specializing, run_model,
                                    shim_root, strip_shim)

_REGISTERED_LEAVES: list[type] = []
_REGISTERED_LEAF_NAMES: set[str] = set()      # "package.module.Class" of classes not imported here
_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_IMAGE_SIZES = (224, 32, 28, 64, 299, 96)


def register_leaf_module(cls: type | str) -> type | str:
    """Register a module class that tracing must keep as one opaque ``call_module`` node
    (graphsel's own trainable modules, e.g. selective convolutions, use this), or its qualified
    name (``"timm.layers.std_conv.StdConv2d"``: a library that need not be imported). Usable as
    a class decorator."""
    if isinstance(cls, str):
        if not all(part.isidentifier() for part in cls.split(".")) or "." not in cls:
            raise ValueError(f"register_leaf_module: {cls!r} is not a qualified class name")
        _REGISTERED_LEAF_NAMES.add(cls)
        return cls
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf_module expects an nn.Module subclass, got {cls!r}")
    if cls not in _REGISTERED_LEAVES:
        _REGISTERED_LEAVES.append(cls)
    return cls


def _named_leaf(m: nn.Module) -> bool:
    return bool(_REGISTERED_LEAF_NAMES) and any(
        f"{k.__module__}.{k.__qualname__}" in _REGISTERED_LEAF_NAMES for k in type(m).__mro__)


class _BufferProxy(ParameterProxy):
    """Proxy of a buffer read through ``self.<name>``: like torch.fx's ``ParameterProxy``, its
    shape, size(), dim(), ndim and numel() are the buffer's (torch.fx asserts that a
    ``ParameterProxy`` wraps an ``nn.Parameter``, so with ``param_shapes_constant=True`` and
    ``proxy_buffer_attributes=True`` together every module reading a buffer failed to trace)."""

    def __init__(self, tracer, node: fx.Node, name: str, buffer: torch.Tensor):
        fx.Proxy.__init__(self, node, tracer)
        self.param = buffer
        self.name = name


class GraphselTracer(fx.Tracer):
    """The tracer behind :func:`trace` (see the module docstring)."""

    proxy_buffer_attributes = True

    def __init__(self, leaf_types: Sequence[type] = (), leaf_paths: Iterable[str] = ()):
        super().__init__(param_shapes_constant=True)
        self.leaf_types = tuple(_REGISTERED_LEAVES) + tuple(leaf_types)
        self.leaf_paths = set(leaf_paths)
        self._stack: list[str] = []
        self.failure_stack: list[str] | None = None

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if isinstance(attr_val, torch.Tensor) and not isinstance(attr_val, nn.Parameter):
            for name, buf in self.root.named_buffers():
                if attr_val is buf:
                    if name not in parameter_proxy_cache:
                        parameter_proxy_cache[name] = self.create_proxy(
                            "get_attr", name, (), {},
                            proxy_factory_fn=lambda node, n=name, b=buf: _BufferProxy(self, node, n, b))
                    return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if _named_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            path = self.path_of_module(m)
        except NameError:
            return super().call_module(m, forward, args, kwargs)
        if self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        self._stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failure_stack is None:
                self.failure_stack = list(self._stack)
            raise
        finally:
            self._stack.pop()


_SpecializingTracer = make_specializing(GraphselTracer)


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _user_frame(exc: BaseException) -> str:
    """``file:line: code`` of the last traceback frame outside torch (the user's statement)."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        if not fr.filename.startswith((_TORCH_DIR, _OWN_DIR)):
            return f"{fr.filename}:{fr.lineno}: {(fr.line or '').strip()}"
    if frames:
        fr = frames[-1]
        return f"{fr.filename}:{fr.lineno}: {(fr.line or '').strip()}"
    return ""


def _short(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    return f"{type(exc).__name__}: {msg}"[:300]


def _flag_arguments(model: nn.Module | None) -> str:
    """``{'flip': False}`` for the non-tensor (defaulted) arguments of ``model.forward``."""
    if model is None:
        return "{'flag': value}"
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return "{'flag': value}"
    flags = {p.name: p.default for p in params
             if p.default is not inspect.Parameter.empty and not isinstance(p.default, torch.Tensor)}
    return repr(flags) if flags else "{'flag': value}"


def _remedy(exc: BaseException, path: str, model: nn.Module | None = None) -> str:
    msg = str(exc)
    if "iterate" in msg or "'len' is not supported" in msg:
        cause = "the code iterates over or takes len() of a tensor"
    elif "control flow" in msg:
        cause = ("the code branches on a traced value (a tensor, a shape, or a non-tensor argument); "
                 f"pass concrete_args={_flag_arguments(model)} (with the values you need) for flag arguments "
                 "or replace `assert` by torch._assert")
    else:
        cause = "the code cannot be traced symbolically"
    if not path:
        return (f"{cause}. The failing code is in the model's own forward, which cannot be made opaque: "
                f"change it, pass graphsel.trace(model, concrete_args=...) for non-tensor forward arguments, "
                f"or move it into a submodule and name that in leaf_modules=[...].")
    return (f"{cause}; or keep the module opaque: graphsel.trace(model, leaf_modules=['{path}']) "
            f"(or its class in leaf_modules).")


def as_tuple(example_inputs: Any) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _first_param(model: nn.Module) -> torch.Tensor | None:
    for p in model.parameters():
        return p
    for b in model.buffers():
        if b.is_floating_point():
            return b
    return None


def infer_example_inputs(gm: fx.GraphModule) -> tuple[tuple, str]:
    """A default input for an image classifier: one sample with the first convolution's input
    channels, at the first of 224, 32, 28, 64, 299, 96 pixels that runs. Returns (inputs, note)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]
    if len(required) != 1:
        raise ExampleInputError(
            f"cannot infer example inputs for a model whose forward takes {len(required)} inputs "
            f"({', '.join(n.target for n in required)}); pass example_inputs=(...).")
    first = None
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                first = m
                break
    if first is None:
        raise ExampleInputError("cannot infer example inputs: the model has no convolution or linear layer "
                                "to read the input channels from; pass example_inputs=(...).")
    ref = _first_param(gm)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    device = ref.device if ref is not None else torch.device("cpu")
    if isinstance(first, nn.Linear):
        x = torch.randn(1, first.in_features, dtype=dtype, device=device)
        propagate_shapes(gm, (x,))
        return (x,), (f"example input inferred from the first Linear: {tuple(x.shape)}; pass example_inputs=... "
                      f"to choose another")
    c = first.in_channels
    spatial_dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(first)] if type(first) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) else 2
    errors = []
    for s in DEFAULT_IMAGE_SIZES:
        size = (1, c) + (s,) * spatial_dims if spatial_dims < 3 else (1, c, 16, s // 2, s // 2)
        x = torch.randn(size, dtype=dtype, device=device)
        try:
            propagate_shapes(gm, (x,))
            return (x,), (f"example input inferred from the first convolution ({c} input channels): "
                          f"{tuple(size)}; pass example_inputs=... to choose another")
        except ExampleInputError as e:
            errors.append(f"{s}px: {e.__cause__!s:.120}")
    raise ExampleInputError("cannot infer example inputs: the model runs on none of the default sizes "
                            f"({'; '.join(errors)}); pass example_inputs=(...).")


def trace(model: nn.Module, example_inputs: Any = None, *, leaf_modules: Sequence[type | str] = (),
          concrete_args: dict[str, Any] | None = None, max_auto_leaves: int = 64,
          share_parameters: bool = False) -> fx.GraphModule:
    """Trace ``model`` into a :class:`torch.fx.GraphModule` (see the module docstring).

    ``example_inputs`` (a tensor or a tuple of tensors) are used for shape propagation; without
    them an image-classifier input is inferred from the first convolution and the report says so.
    ``leaf_modules`` may hold module classes and dotted module paths to keep opaque.
    ``share_parameters``: the copy holds ``model``'s own Parameter objects instead of copies
    (buffers are always copied). Whoever asks for this must not write into them and must clone
    what is still shared before handing the module out (``graphsel.transform(verify=False)``
    does both); by default nothing is shared.
    The graph has eval-mode semantics (module docstring); every module of the returned
    GraphModule has the training flag of its counterpart in ``model``, which is never touched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"graphsel.trace expects a torch.nn.Module, got {type(model).__name__}. "
                        f"Wrap functions in an nn.Module whose forward calls them.")
    inputs = as_tuple(example_inputs)
    if inputs is not None:
        for i, t in enumerate(inputs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"example_inputs[{i}] is a {type(t).__name__}; graphsel needs tensors "
                                f"(pass non-tensor arguments through concrete_args=...).")
    leaf_types, leaf_paths = [], []
    for item in leaf_modules:
        if isinstance(item, str):
            leaf_paths.append(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            leaf_types.append(item)
        else:
            raise TypeError(f"leaf_modules entries must be nn.Module classes or dotted paths, got {item!r}")
    for p in leaf_paths:
        try:
            model.get_submodule(p)
        except AttributeError:
            raise ValueError(f"leaf_modules names '{p}', which is not a submodule of {type(model).__name__}") from None

    t0 = time.perf_counter()
    leafed: list[LeafRecord] = []
    try:
        work, graph = _trace_with_auto_leafing(model, leaf_types, leaf_paths, leafed, concrete_args, max_auto_leaves,
                                               training=False, share_parameters=share_parameters)
        failure = None
    except TraceError as e:
        failure = e
    specialized = None
    if (failure is not None or leafed) and inputs is not None:
        # a forward that branches on its input's shapes: trace it specialised to the example inputs
        fixed = fixed_defaults(model, len(inputs), concrete_args)
        leafed_here: list[LeafRecord] = []
        try:
            work2, graph2 = _trace_with_auto_leafing(model, leaf_types, leaf_paths, leafed_here, fixed,
                                                     max_auto_leaves, training=False,
                                                     share_parameters=share_parameters, specialize=inputs)
            if failure is not None or len(leafed_here) < len(leafed):
                work, graph, leafed, failure = work2, graph2, leafed_here, None
                specialized = (fixed, {k: v for k, v in fixed.items() if k not in (concrete_args or {})})
                concrete_args = fixed
        except TraceError:
            pass
    if failure is not None:
        raise failure
    train_differs = False
    if specialized is None and any(m.training for m in module_index(model).values()):
        # The graph is traced with eval semantics (what graphsel verifies and deploys). Code that
        # reads self.training as a Python value (F.dropout(training=self.training), `if self.training:`)
        # is specialised at trace time; say so when the train-mode trace would differ.
        try:
            _, train_graph = _trace_with_auto_leafing(model, leaf_types, leaf_paths, list(leafed), concrete_args,
                                                      max_auto_leaves, training=True, share_parameters=True)
            train_differs = _graph_signature(train_graph) != _graph_signature(graph)
        except Exception:  # noqa: BLE001 - informative only
            train_differs = True
    _concrete_values_as_defaults(graph, concrete_args)
    kept_type = specialized is not None and keep_output_type(
        graph, run_model(work.eval(), inputs, specialized[0]), len(inputs))
    gm = fx.GraphModule(work, graph, class_name=type(model).__name__)
    mark_compiled(gm)
    _copy_training_flags(model, gm)
    meta = GraphselMeta(model_class=f"{type(model).__module__}.{type(model).__qualname__}", leafed=leafed)
    gm.meta[META_KEY] = meta
    for r in leafed:
        meta.notes.append(f"leafed '{r.path}' ({r.cls}): {r.reason}; its channels are frozen")
    if specialized is not None:
        shapes = ", ".join("×".join(map(str, t.shape)) for t in inputs)
        fixed_now = ", ".join(f"{k}={v!r}" for k, v in specialized[1].items())
        meta.notes.append(f"the forward branches on its input's shapes: traced specialised to {shapes}"
                          + (f"; arguments fixed to their defaults: {fixed_now}" if fixed_now else "")
                          + ("; the output keeps its type" if kept_type else ""))
    if train_differs:
        meta.notes.append("the model's forward reads self.training as a Python value (functional dropout or "
                          "`if self.training:` branches): the graph was traced with eval-mode semantics, so "
                          "train-only code outside torch.nn modules is not in the graph")
    if inputs is None:
        inputs, note = infer_example_inputs(gm)
        meta.notes.append(note)
    else:
        propagate_shapes(gm, inputs)
    meta.trace_seconds = time.perf_counter() - t0
    gm.meta["graphsel_example_inputs"] = inputs
    return gm


def _trace_with_auto_leafing(model: nn.Module, leaf_types: list, leaf_paths: list, leafed: list[LeafRecord],
                             concrete_args, max_auto_leaves: int, training: bool,
                             share_parameters: bool = False, specialize: tuple | None = None
                             ) -> tuple[nn.Module, fx.Graph]:
    """Trace a deep copy of ``model`` (every module's flag set to ``training``), making the innermost
    failing submodule a leaf and retrying; appends to ``leafed``. Returns (copy, graph); the
    caller gives the modules it keeps the flags of ``model`` back. ``specialize``: the example
    inputs to specialise shapes to (:mod:`graphsel.ir.specialize`)."""
    # buffers: cloned up front where that is what deepcopy would do (cheaper than deepcopy)
    shared = clone_memo(list(model.parameters()) + list(model.buffers()), model.buffers())
    if share_parameters:
        shared.update({id(p): p for p in model.parameters()})
    while True:
        work = deepcopy_module(model, dict(shared))
        work.train(training)
        paths = list(leaf_paths) + [r.path for r in leafed]
        try:
            if specialize is None:
                tracer = GraphselTracer(leaf_types, paths)
                graph = tracer.trace(work, concrete_args=concrete_args)
            else:
                # through a root of plain signature that calls the model with the fixed arguments
                # (torch.fx mis-binds the arguments of decorated forwards such as HuggingFace's)
                tracer = _SpecializingTracer(leaf_types, [f"{SHIM_PREFIX}.{p}" for p in paths],
                                             example_inputs=specialize)
                graph = strip_shim(tracer.trace(shim_root(work, len(specialize), concrete_args or {})))
            break
        except MemoryError:
            raise                 # not a tracing failure: leafing the module would hide it
        except Exception as e:  # noqa: BLE001
            stack = [p[len(SHIM_PREFIX) + 1:] if specialize is not None else p for p in tracer.failure_stack or []
                     if specialize is None or p.startswith(SHIM_PREFIX + ".")]
            if not stack:
                raise TraceError(
                    f"cannot trace {type(model).__name__}: {_short(e)} (the failure is in the model's own "
                    f"forward, which cannot be made a leaf)", module_path="",
                    source_line=_user_frame(e), remedy=_remedy(e, "", model)) from e
            path = stack[-1]
            if path in leaf_paths or any(r.path == path for r in leafed) or len(leafed) >= max_auto_leaves:
                raise TraceError(f"cannot trace {type(model).__name__}: {_short(e)}", module_path=path,
                                 source_line=_user_frame(e),
                                 remedy=_remedy(e, path, _get_submodule(model, path))) from e
            sub = work.get_submodule(path)
            leafed.append(LeafRecord(path, type(sub).__qualname__, _short(e)))
    return work, graph


def _copy_training_flags(src: nn.Module, dst: nn.Module) -> None:
    """Give every module of ``dst`` the training flag of the module at the same path in ``src``
    (modules without a counterpart, e.g. GraphModule containers, take the nearest ancestor's)."""
    flags = {name: m.training for name, m in module_index(src).items()}
    for name, m in module_index(dst).items():
        path = name
        while path not in flags:
            path = path.rpartition(".")[0]
        m.training = flags[path]


def _concrete_values_as_defaults(graph: fx.Graph, concrete_args: dict[str, Any] | None) -> None:
    """torch.fx keeps a placeholder ``<name>_1`` for each scalar concrete argument, with the
    signature's default, guarded by ``torch._assert(<name>_1 == value)``: calling the module with
    tensors only then fails the guard whenever the value is not the default. Make the concrete
    value the default, so the traced module runs on its tensor inputs alone (as graphsel does)."""
    for name, value in (concrete_args or {}).items():
        if isinstance(value, (PHBase, list, tuple, dict, torch.Tensor)):
            continue
        for n in graph.find_nodes(op="placeholder"):
            if n.target == f"{name}_1":
                n.args = (value,)


def _graph_signature(graph: fx.Graph) -> list[tuple]:
    return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph.nodes]


def example_inputs_of(gm: fx.GraphModule) -> tuple | None:
    """The example inputs recorded at trace time (None for a GraphModule graphsel did not trace)."""
    return gm.meta.get("graphsel_example_inputs")
