"""graphsel checkpoints: a model as data, loaded without running code from the file.

A checkpoint (``graphsel.save(gm, "model.graphsel")``) is a zip archive of four members:

* ``meta.json``: the format and graphsel version, a summary of the model (class, nodes,
  parameters) and its :class:`~graphsel.ir.meta.GraphselMeta` (trace notes, inputs, leafed
  modules, pass history, masks, per-pass state) as tagged JSON. ``graphsel report`` reads only
  this member.
* ``graph.json``: the torch.fx graph, node by node (name, op, target, args and kwargs as tagged
  JSON: node references, tuples, slices, Ellipsis, dtypes, devices, memory formats, floats
  including inf and nan, strings), the GraphModule's class name, and the example inputs.
* ``modules.json``: the module tree (class by qualified name, training flag, parameters and
  buffers with their persistence, children, every other attribute as tagged JSON) and the
  table of tensors.
* ``tensors.safetensors``: every parameter, buffer, tensor attribute and example input. A tensor
  is stored once, however many modules hold it; tensors that share memory (views, tied weights
  of different shapes) are stored as the bytes of their common storage and rebuilt as views of
  it, so aliasing, strides and values come back exactly.

**Loading runs no code named by the file** except what the allowlist permits: classes (module
classes, attribute values) and functions (``call_function`` targets, attribute values) are named
``"module:qualname"`` and resolved only inside torch, torchvision, timm, graphsel (and
graphsel.passes), ``operator``, ``math`` and a few ``builtins`` — minus the parts of those
packages that read or write files, download, compile or load code (``DENIED_MODULES``,
``DENIED_NAMES``) — and among the classes and functions registered with
:func:`graphsel.register_op` / :func:`graphsel.register_leaf_module` in the loading process.
Modules are created with ``object.__new__`` and get their attributes back directly; no
``__new__``, ``__init__``, ``__setstate__`` or ``__reduce__`` runs. The names torch.fx
writes into the Python source it generates (node names, placeholder, method, module and
attribute targets, the class name) are validated before the graph is built. Then the model
runs once, on the stored example inputs, to record shapes (``propagate_shapes``).

Saving refuses, with a :class:`CheckpointError` naming the module path and attribute, anything
it cannot describe as data: a lambda or a function of ``__main__``, a hook, a tensor of an unusual
type. ``graphsel.save(gm, path, trust_pickle=True)`` writes the old pickle format instead.
"""
from __future__ import annotations

import base64
import dataclasses
import enum
import functools
import importlib
import json
import keyword
import math
import os
import re
import sys
import tempfile
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
import torch.nn as nn

from graphsel.errors import GraphselError
from graphsel.ir.graph import mark_compiled
from graphsel.ir.meta import META_KEY, GraphselMeta, new_version
from graphsel.ir.specialize import OutputTypeCodeGen
from graphsel.version import __version__

FORMAT = "graphsel"
FORMAT_VERSION = 1
SUFFIX = ".graphsel"
META, GRAPH, MODULES, TENSORS = "meta.json", "graph.json", "modules.json", "tensors.safetensors"
MEMBERS = (META, GRAPH, MODULES, TENSORS)
EXAMPLE_INPUTS_KEY = "graphsel_example_inputs"
_CODE_KEY = "graphsel_code_key"        # graphsel.ir.graph.CODE_KEY: regenerated, never stored
_MAX_JSON_BYTES = 1 << 30


class CheckpointError(GraphselError, ValueError):
    """A model that cannot be saved as data, or a file that is not a valid graphsel checkpoint
    (or names something outside the allowlist)."""


# ================================================================================================
# the allowlist

#: packages whose classes and functions a checkpoint may name
ALLOWED_MODULES = ("torch", "torchvision", "timm", "graphsel", "operator", "_operator", "math")
#: parts of them that read or write files, download, compile or load code: never resolved
DENIED_MODULES = (
    "torch.hub", "torch.serialization", "torch.package", "torch.jit", "torch.onnx", "torch.export",
    "torch._export", "torch.compiler", "torch._dynamo", "torch._inductor", "torch.distributed",
    "torch.multiprocessing", "torch.utils", "torch.library", "torch._library", "torch.fx", "torch.testing",
    "torch.profiler", "torch.autograd.profiler", "torch.cuda", "torch.mps", "torch.xpu", "torch.backends",
    "torch._C", "torch._ops", "torch._classes", "torch.storage", "torch._utils", "torch._logging",
    "torchvision.io", "torchvision.datasets", "torchvision.utils", "torchvision.models._api",
    "torchvision._internally_replaced_utils", "torchvision.extension",
    "timm.models._hub", "timm.models._helpers", "timm.models._builder", "timm.models._registry",
    "timm.models._pretrained", "timm.data", "timm.utils",
    "graphsel.tools", "graphsel.passes.dcp.finetune", "graphsel.passes.dcp.data",
)
#: submodules of denied ones that hold only computation (torch's C operators, graphsel's nets)
REALLOWED_MODULES = ("torch._C._nn", "torch._C._fft", "torch._C._linalg", "torch._C._special",
                     "torch._C._VariableFunctions", "graphsel.tools.models")
#: attribute names never resolved, whatever the module (file I/O, code loading, compilation)
DENIED_NAMES = frozenset({
    "load", "loads", "save", "from_file", "compile", "exec", "eval", "system", "open", "load_library",
    "_load_from_bytes", "load_state_dict_from_url", "download_url_to_file", "set_default_device",
    "call", "attrgetter", "methodcaller"})
#: builtins a checkpoint may name (no code execution, no I/O)
SAFE_BUILTINS = {f.__name__: f for f in (
    getattr, hasattr, len, int, float, bool, str, tuple, list, dict, set, frozenset, slice, range, min, max,
    abs, round, sum, divmod, pow, isinstance, complex)}


def _tracers() -> dict[str, type]:
    """The tracer classes a GraphModule may remember (``gm._tracer_cls``), by fixed name."""
    from graphsel.ir.tracing import GraphselTracer

    return {"graphsel.ir.tracing:GraphselTracer": GraphselTracer, "torch.fx._symbolic_trace:Tracer": fx.Tracer}


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# a module or attribute name (``layer1``, ``0``, regnet's ``block1-0``): what torch.fx may quote in
# ``getattr(self, "...")`` — word characters and dashes, never a quote, backslash or newline
_PATH_PART = re.compile(r"[\w\-]+\Z")


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@functools.lru_cache(maxsize=4096)
def module_allowed(module: str) -> bool:
    """Whether classes and functions of ``module`` may be named by a checkpoint."""
    if not _in(module, ALLOWED_MODULES):
        return False
    return not _in(module, DENIED_MODULES) or _in(module, REALLOWED_MODULES)


_REGISTRY_CACHE: list = [None, None, None, {}]    # (key, names → objects, qualnames, resolved names)


def _registry() -> tuple[dict[str, Any], set[str]]:
    """``"module:qualname"`` → object for every class and function registered in this process
    (graphsel.register_op, graphsel.register_leaf_module), and the registered qualified names."""
    from graphsel.ir import tracing
    from graphsel.ops.table import registered, table_version

    leaves = tuple(tracing._REGISTERED_LEAVES)
    leaf_names = frozenset(getattr(tracing, "_REGISTERED_LEAF_NAMES", ()))   # classes registered by name
    key = (table_version(), leaves, leaf_names)
    if _REGISTRY_CACHE[0] != key:
        table = registered()
        out: dict[str, Any] = {}
        for obj in list(leaves) + list(table["modules"]) + list(table["functions"]):
            name = _attr_name(obj)
            if name is not None:
                out.setdefault(name, obj)
        _REGISTRY_CACHE[:] = [key, out, set(table["qualnames"]) | set(leaf_names), {}]
    return _REGISTRY_CACHE[1], _REGISTRY_CACHE[2]


def _registered() -> dict[str, Any]:
    return _registry()[0]


def _registered_qualnames() -> set[str]:
    return _registry()[1]


def _attr_name(obj: Any) -> str | None:
    mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(mod, str) and isinstance(qual, str):
        return f"{mod}:{qual}"
    return None


def _is_identifier(s: Any) -> bool:
    return isinstance(s, str) and bool(_IDENT.match(s)) and not keyword.iskeyword(s)


def _is_dotted(s: Any, part=_IDENT) -> bool:
    return isinstance(s, str) and bool(s) and all(part.match(p) and not keyword.iskeyword(p) for p in s.split("."))


def resolve(name: str, what: str) -> Any:
    """The class or function a checkpoint names (``"module:qualname"``), through the allowlist
    only; :class:`CheckpointError` names anything else. ``what`` says where the name was found."""
    if not isinstance(name, str):
        raise CheckpointError(f"{what}: expected a 'module:qualname' name, found {name!r}")
    _registry()
    done = _REGISTRY_CACHE[3]
    if name not in done:
        done[name] = _resolve(name, what)
    return done[name]


def _resolve(name: str, what: str) -> Any:
    registered = _registered()
    if name in registered:
        return registered[name]
    module, sep, qual = name.partition(":")
    if module == "builtins" and qual in SAFE_BUILTINS:
        return SAFE_BUILTINS[qual]
    if not sep or not _is_dotted(module) or not _is_dotted(qual):
        raise CheckpointError(f"{what}: '{name}' is not a 'module:qualname' name")
    if f"{module}.{qual}" not in _registered_qualnames():
        if not module_allowed(module):
            raise CheckpointError(
                f"{what}: '{name}' is not on graphsel's allowlist (torch, torchvision, timm, graphsel, operator, "
                f"math, a few builtins, and what graphsel.register_op / register_leaf_module registered in this "
                f"process); graphsel refuses to import it. If you trust the file and the class or function is "
                f"yours, register it before loading")
        parts = qual.split(".")
        bad = [p for p in parts if p in DENIED_NAMES or p.startswith("__")]
        if bad:
            raise CheckpointError(f"{what}: '{name}' names '{bad[0]}', which graphsel never resolves from a file "
                                  f"(file access, code loading or attribute tricks)")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise CheckpointError(f"{what}: '{name}': cannot import '{module}': {e}") from e
    for i, part in enumerate(qual.split(".")):
        if i and not isinstance(obj, type):
            raise CheckpointError(f"{what}: '{name}' reaches through a {type(obj).__name__}, not a class")
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CheckpointError(f"{what}: '{name}' does not exist in this installation "
                                  f"(a different version of {module.split('.')[0]}?)") from None
        if isinstance(obj, types.ModuleType):
            raise CheckpointError(f"{what}: '{name}' names a module, not a class or function")
    home = getattr(obj, "__module__", None)
    explicit = name in registered or f"{module}.{qual}" in _registered_qualnames()
    if isinstance(home, str) and home != module and not (module_allowed(home) or home == "builtins"
                                                         and any(obj is f for f in SAFE_BUILTINS.values())):
        if not explicit:
            raise CheckpointError(f"{what}: '{name}' is {home}.{getattr(obj, '__qualname__', '?')}, which is "
                                  f"not on graphsel's allowlist")
    if not explicit and not isinstance(obj, type) and not _library_function_ok(obj, home or module):
        raise CheckpointError(f"{what}: '{name}' is a {module.split('.')[0]} function that is neither an operator "
                              f"(torchvision.ops, timm.layers, graphsel's operator table) nor a function torch.fx "
                              f"keeps as a call (torch.fx.wrap, timm's register_notrace_function): graphsel does "
                              f"not call it from a file (model builders download weights, for one)")
    return obj


def _library_function_ok(obj: Any, home: str) -> bool:
    """Functions of torchvision and timm (model builders among them: they may download weights)
    are resolved only when they are operators: in ``torchvision.ops`` / ``timm.layers``, in
    graphsel's operator table, or marked as leaf calls for torch.fx (``torch.fx.wrap``, timm's
    ``register_notrace_function``), which is how they come to be ``call_function`` targets."""
    if not _in(home, ("torchvision", "timm")) or _in(home, ("torchvision.ops", "timm.layers")):
        return True
    from graphsel.ops.table import spec_of_function

    if spec_of_function(obj) is not None:
        return True
    try:
        from torch.fx._symbolic_trace import _wrapped_fns_to_patch

        globs = getattr(obj, "__globals__", None)
        if globs is not None and (id(globs), getattr(obj, "__name__", None)) in _wrapped_fns_to_patch:
            return True
    except ImportError:
        pass
    try:
        from timm.layers._fx import _autowrap_functions

        return obj in _autowrap_functions
    except ImportError:
        return False


def global_name(obj: Any, where: str) -> str:
    """The allowlisted ``"module:qualname"`` that :func:`resolve` turns back into ``obj``."""
    candidates = []
    direct = _attr_name(obj)
    if direct is not None:
        candidates.append(direct)
    if SAFE_BUILTINS.get(getattr(obj, "__name__", None)) is obj:
        candidates.insert(0, f"builtins:{obj.__name__}")
    try:
        from torch.fx.node import _get_qualified_name

        dotted = _get_qualified_name(obj)
    except Exception:  # noqa: BLE001
        dotted = None
    if isinstance(dotted, str):
        parts = dotted.split(".")
        for i in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:i])
            if module in sys.modules:
                candidates.insert(0, f"{module}:{'.'.join(parts[i:])}")
                break
    reasons = []
    for name in dict.fromkeys(candidates):
        try:
            if resolve(name, where) is obj:
                return name
            reasons.append(f"'{name}' resolves to another object")
        except CheckpointError as e:
            reasons.append(str(e).split(": ", 1)[-1])
    what = direct or repr(obj)
    if "<locals>" in (getattr(obj, "__qualname__", "") or "") or getattr(obj, "__name__", "") == "<lambda>":
        reasons = ["a lambda or local function has no importable name"]
    elif (getattr(obj, "__module__", "") or "") == "__main__":
        reasons = ["it is defined in __main__ and not registered with graphsel.register_op / register_leaf_module"]
    raise CheckpointError(
        f"cannot save {where}: {_kind(obj)} {what} cannot be described as data ({'; '.join(reasons) or 'no name'}). "
        f"Register it with graphsel.register_op / graphsel.register_leaf_module (then loading needs the same "
        f"registration), remove it, save with graphsel.save(gm, path, trust_pickle=True) (a pickle: loading it "
        f"runs code), or deploy with graphsel.export(gm, path, 'pt2')")


def _kind(obj: Any) -> str:
    if isinstance(obj, type):
        return "class"
    if callable(obj):
        return "function"
    return type(obj).__name__


# ================================================================================================
# tensors

_DIRECT_DTYPES = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                            torch.float16, torch.bfloat16, torch.float32, torch.float64})
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_MEMORY_FORMATS = {n: getattr(torch, n) for n in ("contiguous_format", "channels_last", "channels_last_3d",
                                                   "preserve_format")}
_LAYOUTS = {n: getattr(torch, n) for n in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr",
                                           "sparse_bsc", "_mkldnn") if hasattr(torch, n)}


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _dtype(name: Any, what: str) -> torch.dtype:
    d = _DTYPES.get(name) if isinstance(name, str) else None
    if d is None:
        raise CheckpointError(f"{what}: unknown dtype {name!r}")
    return d


class _TensorWriter:
    """Collects the tensors of a checkpoint (each object once) and lays them out for safetensors."""

    def __init__(self):
        self.tensors: list[torch.Tensor] = []
        self.where: list[str] = []
        self.index: dict[int, int] = {}

    def ref(self, t: torch.Tensor, where: str) -> int:
        hit = self.index.get(id(t))
        if hit is not None:
            return hit
        if type(t) not in (torch.Tensor, nn.Parameter):
            raise CheckpointError(f"cannot save {where}: a tensor of type {type(t).__module__}.{type(t).__qualname__} "
                                  f"(only torch.Tensor and nn.Parameter are saved as data); save with "
                                  f"graphsel.save(gm, path, trust_pickle=True) or export the model")
        problem = None
        if t.layout is not torch.strided:
            problem = f"layout {t.layout}"
        elif t.is_quantized:
            problem = "a quantized tensor"
        elif t.device.type == "meta":
            problem = "a tensor on the meta device (no data)"
        elif getattr(t, "is_nested", False):
            problem = "a nested tensor"
        elif t.is_conj() or t.is_neg():
            problem = "a lazily conjugated or negated view"
        elif t.__dict__:
            problem = f"a tensor with Python attributes ({', '.join(sorted(t.__dict__)[:4])})"
        if problem:
            raise CheckpointError(f"cannot save {where}: {problem} is not saved as data; save with "
                                  f"graphsel.save(gm, path, trust_pickle=True) or export the model")
        self.index[id(t)] = len(self.tensors)
        self.tensors.append(t)
        self.where.append(where)
        return len(self.tensors) - 1

    def finish(self) -> tuple[list[dict], dict[str, torch.Tensor]]:
        storages: dict[tuple, list[int]] = {}
        for i, t in enumerate(self.tensors):
            if t.numel() and t.untyped_storage().nbytes():
                key = (str(t.device), t.untyped_storage().data_ptr())
                storages.setdefault(key, []).append(i)
        payload: dict[str, torch.Tensor] = {}
        used: set[str] = set()

        def fresh(base: str) -> str:
            name, n = base or "tensor", 1
            while name in used:
                name, n = f"{base}#{n}", n + 1
            used.add(name)
            return name

        blob_of: dict[tuple, str] = {}
        table: list[dict] = []
        for i, t in enumerate(self.tensors):
            d: dict[str, Any] = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape),
                                 "parameter": isinstance(t, nn.Parameter), "requires_grad": t.requires_grad,
                                 "device": str(t.device)}
            if not t.numel() or not t.untyped_storage().nbytes():
                d.update(empty=True, stride=list(t.stride()))
                table.append(d)
                continue
            key = (str(t.device), t.untyped_storage().data_ptr())
            exclusive = (len(storages[key]) == 1 and t.dtype in _DIRECT_DTYPES and t.is_contiguous()
                         and t.storage_offset() == 0
                         and t.untyped_storage().nbytes() == t.numel() * t.element_size())
            if exclusive:
                d["key"] = fresh(self.where[i])
                payload[d["key"]] = t.detach().cpu()
            else:
                if key not in blob_of:
                    blob_of[key] = fresh(f"storage:{self.where[i]}")
                    raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
                    payload[blob_of[key]] = raw.detach().cpu()
                d.update(storage=blob_of[key], stride=list(t.stride()), offset=t.storage_offset())
            table.append(d)
        return table, payload


class _TensorReader:
    def __init__(self, table: list, payload: dict[str, torch.Tensor], device: torch.device | None):
        if not isinstance(table, list):
            raise CheckpointError("the tensor table is not a list")
        self.table, self.payload, self.device = table, payload, device
        self.made: dict[int, torch.Tensor] = {}

    def get(self, i: Any, what: str) -> torch.Tensor:
        if type(i) is not int or not 0 <= i < len(self.table):
            raise CheckpointError(f"{what}: no tensor #{i!r} in the checkpoint")
        hit = self.made.get(i)
        if hit is None:
            hit = self.made[i] = self._make(self.table[i], f"{what} (tensor #{i})")
        return hit

    def _blob(self, key: Any, what: str) -> torch.Tensor:
        t = self.payload.get(key) if isinstance(key, str) else None
        if t is None:
            raise CheckpointError(f"{what}: tensors.safetensors has no entry {key!r}")
        return t

    def _make(self, d: Any, what: str) -> torch.Tensor:
        if not isinstance(d, dict):
            raise CheckpointError(f"{what}: malformed tensor entry")
        dtype = _dtype(d.get("dtype"), what)
        shape = _int_list(d.get("shape"), what)
        device = self.device if self.device is not None else torch.device(str(d.get("device", "cpu")))
        if d.get("empty"):
            if all(shape):
                raise CheckpointError(f"{what}: an 'empty' tensor of shape {shape}")
            t = torch.empty_strided(shape, _int_list(d.get("stride"), what), dtype=dtype, device=device)
        elif "key" in d:
            t = self._blob(d["key"], what)
            if t.dtype != dtype or list(t.shape) != shape:
                raise CheckpointError(f"{what}: stored as {t.dtype} {list(t.shape)}, described as {dtype} {shape}")
            t = t.to(device)
        else:
            blob = self._blob(d.get("storage"), what)
            if blob.dtype != torch.uint8 or blob.dim() != 1:
                raise CheckpointError(f"{what}: a storage entry must be 1-d uint8")
            blob = self.payload[d["storage"]] = blob.to(device)
            stride, offset = _int_list(d.get("stride"), what), d.get("offset")
            if type(offset) is not int or offset < 0 or len(stride) != len(shape) or any(s < 0 for s in stride):
                raise CheckpointError(f"{what}: malformed view (offset {offset!r}, stride {stride})")
            itemsize = torch.empty(0, dtype=dtype).element_size()
            last = offset + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else offset
            if (last + 1) * itemsize > blob.numel() or blob.numel() % itemsize:
                raise CheckpointError(f"{what}: view out of bounds of its storage")
            t = torch.empty(0, dtype=dtype, device=device).set_(blob.untyped_storage(), offset, shape, stride)
        if d.get("parameter"):
            return nn.Parameter(t, requires_grad=bool(d.get("requires_grad")))
        if d.get("requires_grad"):
            t.requires_grad_(True)
        return t


def _int_list(v: Any, what: str) -> list[int]:
    if not isinstance(v, list) or not all(type(x) is int and x >= 0 for x in v):
        raise CheckpointError(f"{what}: expected a list of non-negative integers, found {v!r}")
    return v


# ================================================================================================
# values as tagged JSON

class OpaqueValue(str):
    """A metadata value graphsel could not store as data (a lambda passed as a pass option, say),
    or a class outside the allowlist: kept as its ``repr`` (what the report shows)."""

    def __repr__(self) -> str:
        return str(self)


_MODULE_TEMPLATE = dict(vars(nn.Module()))
_NN_MODULE_KEYS = frozenset(_MODULE_TEMPLATE)
# hook registries (handle id → function, or → flag for the *_with_kwargs / *_always_called ones)
_HOOKS = tuple(sorted(k for k in _NN_MODULE_KEYS if "hook" in k and isinstance(_MODULE_TEMPLATE[k], dict)))


class _Encoder:
    """Python values → tagged JSON. ``strict``: refuse what is not data (module attributes);
    otherwise (metadata) store its repr."""

    def __init__(self, tensors: _TensorWriter, modules: "_ModuleWriter | None" = None):
        self.tensors, self.modules = tensors, modules
        self._active: set[int] = set()

    def __call__(self, v: Any, where: str, *, strict: bool = True, graph: bool = False) -> Any:
        try:
            return self._enc(v, where, strict, graph, 0)
        except RecursionError:
            raise CheckpointError(f"cannot save {where}: nested too deeply") from None

    def _enc(self, v: Any, where: str, strict: bool, graph: bool, depth: int) -> Any:
        t = type(v)
        if v is None or t in (bool, int, str):
            return v
        if t is float:
            return v if math.isfinite(v) else {"$float": repr(v)}
        if graph and isinstance(v, fx.Node):
            return {"$node": v.name}
        if t is torch.dtype:
            return {"$dtype": _dtype_name(v)}
        if t is torch.device:
            return {"$device": str(v)}
        if t is torch.memory_format:
            return {"$memory_format": str(v).removeprefix("torch.")}
        if t is torch.layout:
            return {"$layout": str(v).removeprefix("torch.")}
        if v is Ellipsis:
            return {"$ellipsis": None}
        if depth > 200:
            raise CheckpointError(f"cannot save {where}: nested too deeply")
        enc = functools.partial(self._enc, strict=strict, graph=graph, depth=depth + 1)
        if t is complex:
            return {"$complex": [enc(v.real, where), enc(v.imag, where)]}
        if t is bytes:
            return {"$bytes": base64.b64encode(v).decode("ascii")}
        if t is slice:
            return {"$slice": [enc(v.start, where), enc(v.stop, where), enc(v.step, where)]}
        if t is range:
            return {"$range": [v.start, v.stop, v.step]}
        if t is torch.Size:
            return {"$size": list(v)}
        if t is fx.immutable_collections.immutable_list:
            t, v = list, list(v)
        elif t is fx.immutable_collections.immutable_dict:
            t, v = dict, dict(v)
        if t in (list, tuple, set, frozenset, dict, OrderedDict):
            if id(v) in self._active:
                raise CheckpointError(f"cannot save {where}: a container that contains itself")
            self._active.add(id(v))
            try:
                if t is list:
                    return [enc(x, f"{where}[{i}]") for i, x in enumerate(v)]
                if t is tuple:
                    return {"$tuple": [enc(x, f"{where}[{i}]") for i, x in enumerate(v)]}
                if t in (set, frozenset):
                    try:
                        items = sorted(v)
                    except TypeError:
                        items = list(v)
                    return {"$" + t.__name__: [enc(x, where) for x in items]}
                pairs = [(k, enc(x, f"{where}[{k!r}]")) for k, x in v.items()]
                if t is dict and all(type(k) is str and not k.startswith("$") for k, _ in pairs):
                    return dict(pairs)
                return {"$dict" if t is dict else "$odict": [[enc(k, where), x] for k, x in pairs]}
            finally:
                self._active.discard(id(v))
        try:
            out = self._named(v, t, where, strict, graph, enc)
        except CheckpointError:
            if strict:
                raise
            return {"$repr": repr(v)}          # metadata: kept as its repr (graphsel.tools.checkpoint.OpaqueValue)
        if out is not None:
            return out
        if not strict:
            return {"$repr": repr(v)}
        raise CheckpointError(
            f"cannot save {where}: a {t.__module__}.{t.__qualname__} is not saved as data. Remove it (or make it "
            f"a plain attribute), save with graphsel.save(gm, path, trust_pickle=True) (a pickle: loading it runs "
            f"code), or deploy with graphsel.export(gm, path, 'pt2')")


    def _named(self, v: Any, t: type, where: str, strict: bool, graph: bool, enc) -> dict | None:
        """Tensors, modules, and what is named through the allowlist; None for anything else."""
        if isinstance(v, (type, types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType,
                          types.WrapperDescriptorType, torch._ops.OpOverload, torch._ops.OpOverloadPacket)) \
                or (callable(v) and hasattr(v, "__qualname__") and not isinstance(v, (functools.partial, nn.Module))
                    and not dataclasses.is_dataclass(v)):
            return {"$global": global_name(v, where)}
        if graph:
            return None
        if isinstance(v, tuple) and hasattr(t, "_fields"):
            return {"$namedtuple": global_name(t, where), "items": [enc(x, where) for x in v]}
        if isinstance(v, torch.Tensor):
            return {"$tensor": self.tensors.ref(v, where)}
        if isinstance(v, nn.Module) and self.modules is not None:
            return {"$module": self.modules.ref(v, where)}
        if isinstance(v, enum.Enum):
            return {"$enum": [global_name(t, where), v.name]}
        if isinstance(v, functools.partial):
            return {"$partial": [enc(v.func, where), enc(list(v.args), where), enc(dict(v.keywords), where)]}
        if _plain_object(v):
            return {"$object": global_name(t, where), "state": enc(dict(vars(v)), where)}
        return None


def _plain_object(v: Any) -> bool:
    """An instance whose whole state is its ``__dict__`` (no slots, no custom pickling)."""
    if not hasattr(v, "__dict__") or isinstance(v, (nn.Module, torch.Tensor, type, types.ModuleType)) or callable(v):
        return False
    return _plain_class(type(v))


def _plain_class(t: type) -> bool:
    """Instances are their ``__dict__``: no slots, no custom pickling, no finaliser (which would
    run on state from a file)."""
    if any("__slots__" in vars(k) for k in t.__mro__[:-1]):
        return False
    return all(getattr(t, attr, None) is getattr(object, attr, None)
               for attr in ("__reduce_ex__", "__reduce__", "__getstate__", "__setstate__", "__del__"))


class _Decoder:
    """Tagged JSON → Python values, creating nothing the allowlist does not permit."""

    def __init__(self, tensors: _TensorReader | None, modules: list | None = None, *, lenient: bool = False):
        self.tensors, self.modules, self.lenient = tensors, modules, lenient
        self.nodes: dict[str, fx.Node] | None = None

    def __call__(self, v: Any, what: str) -> Any:
        try:
            return self._dec(v, what)
        except RecursionError:
            raise CheckpointError(f"{what}: nested too deeply") from None

    def _global(self, name: Any, what: str) -> Any:
        try:
            return resolve(name, what)
        except CheckpointError:
            if self.lenient:
                return OpaqueValue(f"<{name}>")
            raise

    def _dec(self, v: Any, what: str) -> Any:
        if v is None or type(v) in (bool, int, float, str):
            return v
        if type(v) is list:
            return [self._dec(x, what) for x in v]
        if type(v) is not dict:
            raise CheckpointError(f"{what}: unexpected JSON value {v!r:.80}")
        tags = [k for k in v if k.startswith("$")]
        if not tags:
            return {k: self._dec(x, what) for k, x in v.items()}
        tag, arg = tags[0], v[tags[0]]
        dec = self._dec
        if tag == "$float":
            if arg not in ("inf", "-inf", "nan"):
                raise CheckpointError(f"{what}: bad float {arg!r}")
            return float(arg)
        if tag == "$node":
            if self.nodes is None or arg not in self.nodes:
                raise CheckpointError(f"{what}: reference to unknown node {arg!r}")
            return self.nodes[arg]
        if tag == "$dtype":
            return _dtype(arg, what)
        if tag == "$device":
            try:
                return torch.device(str(arg))
            except (RuntimeError, TypeError) as e:
                raise CheckpointError(f"{what}: bad device {arg!r}") from e
        if tag == "$memory_format":
            return _lookup(_MEMORY_FORMATS, arg, what, "memory format")
        if tag == "$layout":
            return _lookup(_LAYOUTS, arg, what, "layout")
        if tag == "$ellipsis":
            return Ellipsis
        if tag == "$complex":
            re_, im = (dec(x, what) for x in _list(arg, 2, what))
            return complex(_num(re_, what), _num(im, what))
        if tag == "$bytes":
            try:
                return base64.b64decode(str(arg), validate=True)
            except ValueError as e:
                raise CheckpointError(f"{what}: bad base64 data") from e
        if tag == "$slice":
            a = [dec(x, what) for x in _list(arg, 3, what)]
            return slice(*a)
        if tag == "$range":
            a = _list(arg, 3, what)
            if not all(type(x) is int for x in a):
                raise CheckpointError(f"{what}: bad range {arg!r}")
            return range(*a)
        if tag == "$size":
            return torch.Size(_int_list(arg, what))
        if tag == "$tuple":
            return tuple(dec(x, what) for x in _list(arg, None, what))
        if tag in ("$set", "$frozenset"):
            items = [dec(x, what) for x in _list(arg, None, what)]
            try:
                return set(items) if tag == "$set" else frozenset(items)
            except TypeError as e:
                raise CheckpointError(f"{what}: unhashable set item") from e
        if tag in ("$dict", "$odict"):
            out = {} if tag == "$dict" else OrderedDict()
            for pair in _list(arg, None, what):
                k, x = _list(pair, 2, what)
                try:
                    out[dec(k, what)] = dec(x, what)
                except TypeError as e:
                    raise CheckpointError(f"{what}: unhashable dict key") from e
            return out
        if tag == "$repr":
            return OpaqueValue(str(arg))
        if tag == "$global":
            return self._global(arg, what)
        if self.nodes is not None:
            raise CheckpointError(f"{what}: {tag} is not allowed in a graph argument")
        if tag == "$tensor":
            if self.tensors is None:
                return OpaqueValue(f"<tensor #{arg} (not loaded)>")
            return self.tensors.get(arg, what)
        if tag == "$module":
            if self.modules is None or type(arg) is not int or not 0 <= arg < len(self.modules):
                raise CheckpointError(f"{what}: reference to unknown module {arg!r}")
            return self.modules[arg]
        if tag == "$namedtuple":
            cls = self._global(arg, what)
            items = [dec(x, what) for x in _list(v.get("items"), None, what)]
            if isinstance(cls, OpaqueValue):
                return tuple(items)
            if not (isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")):
                raise CheckpointError(f"{what}: {arg} is not a namedtuple class")
            return tuple.__new__(cls, items)
        if tag == "$enum":
            name, member = _list(arg, 2, what)
            cls = self._global(name, what)
            if isinstance(cls, OpaqueValue):
                return OpaqueValue(f"<{name}.{member}>")
            if not (isinstance(cls, type) and issubclass(cls, enum.Enum)) or member not in cls.__members__:
                raise CheckpointError(f"{what}: {name}.{member} is not an enum member")
            return cls.__members__[member]
        if tag == "$partial":
            fn, args, kwargs = _list(arg, 3, what)
            fn, args, kwargs = dec(fn, what), dec(args, what), dec(kwargs, what)
            if isinstance(fn, OpaqueValue):
                return fn
            if not callable(fn) or type(args) is not list or type(kwargs) is not dict:
                raise CheckpointError(f"{what}: malformed partial")
            return functools.partial(fn, *args, **kwargs)
        if tag == "$object":
            cls = self._global(arg, what)
            state = dec(v.get("state"), what)
            if isinstance(cls, OpaqueValue):
                return cls
            if not isinstance(cls, type) or issubclass(cls, (nn.Module, torch.Tensor, type, BaseException)) \
                    or not _plain_class(cls) or type(state) is not dict or not all(type(k) is str for k in state):
                raise CheckpointError(f"{what}: {arg} cannot be rebuilt from data")
            obj = object.__new__(cls)
            try:
                vars(obj).update(state)
            except TypeError as e:
                raise CheckpointError(f"{what}: {arg} instances have no __dict__") from e
            return obj
        raise CheckpointError(f"{what}: unknown tag {tag}")


def _lookup(table: dict, name: Any, what: str, kind: str) -> Any:
    if not isinstance(name, str) or name not in table:
        raise CheckpointError(f"{what}: unknown {kind} {name!r}")
    return table[name]


def _list(v: Any, n: int | None, what: str) -> list:
    if type(v) is not list or (n is not None and len(v) != n):
        raise CheckpointError(f"{what}: malformed entry {v!r:.80}")
    return v


def _num(v: Any, what: str) -> float:
    if type(v) not in (int, float):
        raise CheckpointError(f"{what}: expected a number, found {v!r}")
    return v


# ================================================================================================
# modules

@functools.cache
def _gm_keys() -> frozenset[str]:
    """The attributes torch.fx gives every GraphModule (rebuilt on load, never stored)."""
    return frozenset(vars(fx.symbolic_trace(nn.Identity()))) | {"_in_spec", "_out_spec"}


class _ModuleWriter:
    def __init__(self, tensors: _TensorWriter, root: nn.Module):
        self.tensors, self.root = tensors, root
        self.encode = _Encoder(tensors, self)
        self.entries: list[dict | None] = []
        self.index: dict[int, int] = {}
        self.keep: list[nn.Module] = []

    def ref(self, m: nn.Module, where: str) -> int:
        hit = self.index.get(id(m))
        if hit is not None:
            return hit
        i = self.index[id(m)] = len(self.entries)
        self.entries.append(None)
        self.keep.append(m)
        self.entries[i] = self._describe(m, where)
        return i

    def _describe(self, m: nn.Module, where: str) -> dict:
        at = f"module '{where}'" if where else "the root module"
        cls = type(m)
        is_root_gm = isinstance(m, fx.GraphModule) and m is self.root
        if isinstance(m, fx.GraphModule) and not is_root_gm:
            raise CheckpointError(f"cannot save {at}: a GraphModule nested inside the model; save it on its own")
        hooks = {}
        for registry in _HOOKS:
            items = getattr(m, registry, None)
            if not items:
                continue
            kind = registry.strip("_").replace("_", " ")
            hooks[registry] = []
            for handle, fn in items.items():
                if isinstance(fn, bool):
                    hooks[registry].append([handle, fn])
                    continue
                try:
                    hooks[registry].append([handle, {"$global": global_name(fn, f"{at} {kind}")}])
                except CheckpointError as e:
                    raise CheckpointError(
                        f"cannot save {at} ({cls.__qualname__}): one of its {kind} ({fn!r:.80}) is code that cannot "
                        f"be named from the allowlist ({str(e).split(' (', 1)[-1].split(')')[0]}). Remove the hook, "
                        f"save with graphsel.save(gm, path, trust_pickle=True), or export the model") from None
        if not is_root_gm:
            for attr in ("__reduce__", "__reduce_ex__"):
                if getattr(cls, attr, None) is not getattr(nn.Module, attr, None):
                    raise CheckpointError(f"cannot save {at}: {cls.__qualname__} defines its own {attr} (its state "
                                          f"is not its attributes); save with graphsel.save(gm, path, "
                                          f"trust_pickle=True)")
        prefix = f"{where}." if where else ""
        entry: dict[str, Any] = {
            "class": "fx.GraphModule" if is_root_gm else global_name(cls, at),
            "training": bool(m.training),
            "parameters": {k: None if p is None else self.tensors.ref(p, f"{prefix}{k}")
                           for k, p in m._parameters.items()},
            "buffers": {k: None if b is None else self.tensors.ref(b, f"{prefix}{k}") for k, b in m._buffers.items()},
            "non_persistent": sorted(m._non_persistent_buffers_set),
        }
        if hooks:
            entry["hooks"] = hooks
            entry["full_backward_hook"] = m._is_full_backward_hook
        entry["children"] = {k: None if c is None else self.ref(c, f"{prefix}{k}") for k, c in m._modules.items()}
        skip = _gm_keys() if is_root_gm else _NN_MODULE_KEYS
        attrs = {}
        for k, v in vars(m).items():
            if k in skip or k in _NN_MODULE_KEYS:
                continue
            if _shadows_method(cls, k):
                raise CheckpointError(f"cannot save {at}: its attribute '{k}' replaces the method {cls.__qualname__}."
                                      f"{k} (code, not data); save with graphsel.save(gm, path, trust_pickle=True)")
            attrs[k] = self.encode(v, f"{at} attribute '{k}'" if where else f"the root module's attribute '{k}'")
        entry["attributes"] = attrs
        return entry


def _build_modules(entries: Any, dec: _Decoder) -> list[nn.Module | None]:
    """Create every module (``object.__new__``; the root GraphModule later) and fill it in."""
    if not isinstance(entries, list) or not entries:
        raise CheckpointError("modules.json holds no modules")
    objs: list[Any] = []
    for i, e in enumerate(entries):
        what = f"module #{i}"
        if not isinstance(e, dict):
            raise CheckpointError(f"{what}: malformed entry")
        if e.get("class") == "fx.GraphModule":
            if i != 0:
                raise CheckpointError(f"{what}: only the root may be a GraphModule")
            objs.append(nn.Module())                # a holder, replaced by the GraphModule
            continue
        cls = resolve(e.get("class"), f"{what} class")
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or issubclass(cls, fx.GraphModule) \
                or getattr(cls, "__del__", None) is not None:
            raise CheckpointError(f"{what}: {e.get('class')} is not a torch.nn.Module class built from data")
        objs.append(object.__new__(cls))           # no __new__ or __init__ of the class runs
    dec.modules = objs
    for i, (e, m) in enumerate(zip(entries, objs)):
        what = f"module #{i} ({e.get('class')})"
        state: dict[str, Any] = {k: (type(v)() if isinstance(v, (dict, set)) else v)
                                 for k, v in _MODULE_TEMPLATE.items()}
        state["training"] = bool(e.get("training", True))
        for reg, kind in (("_parameters", "parameters"), ("_buffers", "buffers")):
            items = e.get(kind, {})
            if not isinstance(items, dict):
                raise CheckpointError(f"{what}: malformed {kind}")
            state[reg] = {_name(k, what): None if x is None else dec.tensors.get(x, f"{what} {kind[:-1]} '{k}'")
                          for k, x in items.items()}
        for k, p in state["_parameters"].items():
            if p is not None and not isinstance(p, nn.Parameter):
                raise CheckpointError(f"{what}: parameter '{k}' is not stored as a parameter")
        np_ = e.get("non_persistent", [])
        if not isinstance(np_, list) or not all(isinstance(k, str) and k in state["_buffers"] for k in np_):
            raise CheckpointError(f"{what}: malformed non-persistent buffer list")
        state["_non_persistent_buffers_set"] = set(np_)
        children = e.get("children", {})
        if not isinstance(children, dict):
            raise CheckpointError(f"{what}: malformed children")
        state["_modules"] = {}
        for k, x in children.items():
            if x is not None and (type(x) is not int or not 0 < x < len(objs)):
                raise CheckpointError(f"{what}: child '{k}' refers to unknown module {x!r}")
            state["_modules"][_name(k, what)] = None if x is None else objs[x]
        _restore_hooks(e.get("hooks"), state, dec, what)
        if e.get("full_backward_hook") is not None:
            state["_is_full_backward_hook"] = bool(e["full_backward_hook"])
        attrs = e.get("attributes", {})
        if not isinstance(attrs, dict):
            raise CheckpointError(f"{what}: malformed attributes")
        for k, v in attrs.items():
            if not _is_identifier(k) or k in state or k.startswith("__") or _shadows_method(type(m), k):
                raise CheckpointError(f"{what}: attribute name {k!r} is not allowed (not an identifier, or it "
                                      f"would replace a method of the class)")
            state[k] = dec(v, f"{what} attribute '{k}'")
        vars(m).update(state)
    return objs


@functools.lru_cache(maxsize=65536)
def _shadows_method(cls: type, name: str) -> bool:
    """An instance attribute ``name`` would hide a method of ``cls`` (``forward``, say)."""
    import inspect

    return isinstance(inspect.getattr_static(cls, name, None), (types.FunctionType, staticmethod, classmethod))


def _restore_hooks(hooks: Any, state: dict[str, Any], dec: _Decoder, what: str) -> None:
    """Hook registries back, every handle id replaced by a fresh one of this process (ids from the
    file could collide with handles created here), consistently across the registries."""
    if not hooks:
        return
    if not isinstance(hooks, dict):
        raise CheckpointError(f"{what}: malformed hooks")
    from torch.utils.hooks import RemovableHandle

    fresh: dict[int, int] = {}
    for registry, items in hooks.items():
        if registry not in _HOOKS:
            raise CheckpointError(f"{what}: unknown hook registry {registry!r}")
        target = state[registry]
        for pair in _list(items, None, what):
            handle, value = _list(pair, 2, what)
            if type(handle) is not int:
                raise CheckpointError(f"{what}: malformed hook handle {handle!r}")
            if handle not in fresh:
                fresh[handle] = RemovableHandle(target).id
            value = value if type(value) is bool else dec._global(
                value.get("$global") if isinstance(value, dict) else None, f"{what} {registry}")
            if not (type(value) is bool or callable(value)) or isinstance(value, OpaqueValue):
                raise CheckpointError(f"{what}: hook {value!r} is not a function")
            target[fresh[handle]] = value


def _name(k: Any, what: str) -> str:
    if not isinstance(k, str) or not _PATH_PART.match(k) or keyword.iskeyword(k):
        raise CheckpointError(f"{what}: name {k!r} is not an identifier")
    return k


# ================================================================================================
# graph

_NODE_TYPES = {"torch.Tensor": torch.Tensor, "int": int, "float": float, "bool": bool, "str": str}


def _describe_graph(gm: fx.GraphModule, encode: _Encoder) -> dict:
    codegen = gm.graph._codegen
    output_spec = None
    if isinstance(codegen, OutputTypeCodeGen):      # a dataclass output (ModelOutput): its pytree spec as JSON
        try:
            output_spec = pytree.treespec_dumps(codegen.out_spec)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot save the graph's output type: {type(e).__name__}: {e}") from e
    elif type(codegen) is not fx.graph.CodeGen:
        raise CheckpointError(f"cannot save the graph: it uses the code generator {type(codegen).__qualname__} "
                              f"(pytree inputs or outputs), which graphsel does not save as data; save with "
                              f"graphsel.save(gm, path, trust_pickle=True)")
    nodes = []
    for n in gm.graph.nodes:
        where = f"node '{n.name}'"
        entry: dict[str, Any] = {"name": n.name, "op": n.op}
        if n.op == "call_function":
            entry["target"] = {"$global": global_name(n.target, f"{where} (the function it calls)")}
        else:
            entry["target"] = n.target
        entry["args"] = encode(list(n.args), f"{where} arguments", graph=True)
        entry["kwargs"] = encode(dict(n.kwargs), f"{where} keyword arguments", graph=True)
        if n.type is not None:          # an annotation in the generated code (GoogLeNet's -> GoogLeNetOutputs)
            tname = next((k for k, t in _NODE_TYPES.items() if t is n.type), None)
            if tname is None and isinstance(n.type, type):
                try:
                    tname = {"$global": global_name(n.type, f"{where} type annotation")}
                except CheckpointError:
                    tname = None        # not data (a typing construct, a local class): the annotation is dropped
            if tname is not None:
                entry["type"] = tname
        stack = n.meta.get("nn_module_stack")
        if stack:
            entry["nn_module_stack"] = [[str(k), _stack_path(v), _stack_class(v)] for k, v in stack.items()]
        if n.meta.get("is_wrapped"):          # a torch.fx.wrap'ed function: the code says so, tracing keeps it
            entry["is_wrapped"] = True
        nodes.append(entry)
    return {"class_name": type(gm).__name__, "nodes": nodes, "output_spec": output_spec}


def _stack_path(v: Any) -> str:
    return str(v[0]) if isinstance(v, tuple) and v else str(v)


def _stack_class(v: Any) -> str | None:
    cls = v[1] if isinstance(v, tuple) and len(v) == 2 else None
    if isinstance(cls, type):
        return _attr_name(cls)
    return None if cls is None else str(cls)


def _build_graph(data: Any, dec: _Decoder) -> tuple[fx.Graph, str]:
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise CheckpointError("graph.json holds no node list")
    class_name = data.get("class_name", "GraphModule")
    if not _is_identifier(class_name):
        raise CheckpointError(f"graph.json: class name {class_name!r} is not an identifier")
    graph = fx.Graph()
    dec.nodes = {}
    for i, e in enumerate(data["nodes"]):
        if not isinstance(e, dict):
            raise CheckpointError(f"graph node #{i}: malformed entry")
        name, op, target = e.get("name"), e.get("op"), e.get("target")
        what = f"graph node {name!r}"
        if not _is_identifier(name) or name.startswith("__"):
            raise CheckpointError(f"{what}: a node name must be a Python identifier")
        if name in dec.nodes:
            raise CheckpointError(f"{what}: duplicate node name")
        if op == "placeholder":
            if not (isinstance(target, str) and _is_identifier(target.lstrip("*")) and len(target) - len(
                    target.lstrip("*")) <= 2):
                raise CheckpointError(f"{what}: placeholder target {target!r} is not an identifier")
        elif op == "call_method":
            if not _is_identifier(target) or target.startswith("__") or target in DENIED_NAMES:
                raise CheckpointError(f"{what}: method name {target!r} is not allowed (an identifier, not a dunder "
                                      f"method or one that reads or writes files or compiles code)")
        elif op in ("call_module", "get_attr"):
            if not _is_dotted(target, _PATH_PART) or any(p.startswith("__") for p in target.split(".")):
                raise CheckpointError(f"{what}: {op} target {target!r} is not a dotted module path")
        elif op == "call_function":
            target = dec(target, f"{what} target")
            if not callable(target) or isinstance(target, OpaqueValue):
                raise CheckpointError(f"{what}: call_function target is not a function")
        elif op == "output":
            if target != "output":
                raise CheckpointError(f"{what}: output target must be 'output'")
        else:
            raise CheckpointError(f"{what}: unknown op {op!r}")
        args = dec(e.get("args", []), f"{what} arguments")
        kwargs = dec(e.get("kwargs", {}), f"{what} keyword arguments")
        if type(args) is not list or type(kwargs) is not dict or not all(_is_identifier(k) for k in kwargs):
            raise CheckpointError(f"{what}: malformed arguments")
        if target is getattr and (len(args) < 2 or not _is_identifier(args[1]) or args[1].startswith("__")
                                  or args[1] in DENIED_NAMES):
            raise CheckpointError(f"{what}: getattr needs a literal attribute name (an identifier, not a dunder)")
        tname = e.get("type")
        if isinstance(tname, dict) and set(tname) == {"$global"}:
            type_expr = resolve(tname["$global"], f"{what} type annotation")
            if not isinstance(type_expr, type):
                raise CheckpointError(f"{what}: type annotation {tname['$global']!r} is not a class")
        elif tname is None or isinstance(tname, str) and tname in _NODE_TYPES:
            type_expr = _NODE_TYPES.get(tname) if tname else None
        else:
            raise CheckpointError(f"{what}: unknown type annotation {tname!r}")
        node = graph.create_node(op, target, tuple(args), kwargs, name=name, type_expr=type_expr)
        if node.name != name:
            raise CheckpointError(f"{what}: torch.fx renamed it to {node.name!r} (a reserved or duplicate name)")
        stack = e.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = OrderedDict(
                (str(k), (str(p), _stack_class_back(c))) for k, p, c in (_list(s, 3, what) for s in stack))
        if e.get("is_wrapped") is True and op == "call_function":
            node.meta["is_wrapped"] = True
        dec.nodes[name] = node
    return graph, class_name


def _stack_class_back(name: Any) -> Any:
    if not isinstance(name, str):
        return None
    try:
        return resolve(name, "nn_module_stack")
    except CheckpointError:
        return OpaqueValue(name)


# ================================================================================================
# save and load

def save_checkpoint(model: nn.Module, path: str | os.PathLike | IO[bytes]) -> Path | IO[bytes]:
    """Write ``model`` (a graphsel GraphModule, any GraphModule, or an nn.Module) as a graphsel
    checkpoint (see the module docstring). Raises :class:`CheckpointError` naming the first
    thing that cannot be saved as data; nothing is written then."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"graphsel.save expects a torch.nn.Module, got {type(model).__name__}")
    tensors = _TensorWriter()
    modules = _ModuleWriter(tensors, model)
    encode = modules.encode
    modules.ref(model, "")
    graph = _describe_graph(model, encode) if isinstance(model, fx.GraphModule) else None
    gm_meta = dict(getattr(model, "meta", {}) or {}) if isinstance(model, fx.GraphModule) else {}
    gs_meta = gm_meta.pop(META_KEY, None)
    inputs = gm_meta.pop(EXAMPLE_INPUTS_KEY, None)
    gm_meta.pop(_CODE_KEY, None)
    if graph is not None:
        graph["example_inputs"] = None if inputs is None else encode(list(inputs), "the example inputs")
        graph["tracer"] = next((k for k, v in _tracers().items() if v is getattr(model, "_tracer_cls", None)), None)
        graph["example_inputs_are_tensors"] = inputs is not None and all(isinstance(t, torch.Tensor) for t in inputs)
        graph["meta"] = {k: encode(v, f"gm.meta[{k!r}]") for k, v in gm_meta.items()}
    if gs_meta is not None and not isinstance(gs_meta, GraphselMeta):
        raise CheckpointError(f"cannot save gm.meta[{META_KEY!r}]: a {type(gs_meta).__name__}, not a GraphselMeta")
    meta_doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "graphsel_version": __version__,
        "torch_version": torch.__version__,
        "model": {"class_name": type(model).__name__, "graph_module": graph is not None,
                  "nodes": len(model.graph.nodes) if graph is not None else None,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "graphsel": None if gs_meta is None else encode(gs_meta, "the graphsel metadata (gm.meta['graphsel'])",
                                                        strict=False),
    }
    table, payload = tensors.finish()
    modules_doc = {"root": 0, "modules": modules.entries, "tensors": table}
    members = [(META, _dumps(meta_doc, indent=1)), (GRAPH, _dumps(graph)), (MODULES, _dumps(modules_doc))]
    if not isinstance(path, (str, os.PathLike)):
        _write_archive(path, members, payload)           # a binary file object
        return path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_archive(f, members, payload)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


_ST_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
              torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
              torch.float64: "F64"}


def _write_archive(f, members: list[tuple[str, str]], payload: dict[str, torch.Tensor]) -> None:
    """The zip: JSON members compressed, then ``tensors.safetensors`` (stored) streamed tensor by
    tensor in the safetensors layout (an 8-byte header length, the JSON header, the raw bytes)."""
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT, "format_version": str(FORMAT_VERSION)}}
    start = 0
    for key, t in payload.items():
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [start, start + n]}
        start += n
    if sys.byteorder != "little":
        raise CheckpointError("graphsel checkpoints are written on little-endian machines only")
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with zipfile.ZipFile(f, "w", allowZip64=True) as z:
        for name, text in members:
            z.writestr(name, text, zipfile.ZIP_DEFLATED)
        info = zipfile.ZipInfo(TENSORS, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        with z.open(info, "w", force_zip64=True) as out:
            out.write(len(head).to_bytes(8, "little"))
            out.write(head)
            for t in payload.values():
                if t.numel():
                    out.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))


def _dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False,
                      separators=None if indent else (",", ":"))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a graphsel checkpoint (a zip with graphsel's members), by content."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return META in names and MODULES in names


def _read_json(z: zipfile.ZipFile, name: str, path: Path) -> Any:
    try:
        info = z.getinfo(name)
    except KeyError:
        raise CheckpointError(f"{path}: not a graphsel checkpoint (no {name})") from None
    if info.file_size > _MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {name} is implausibly large ({info.file_size} bytes)")
    try:
        return json.loads(z.read(name).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: {name} is not valid JSON: {e}") from None


def _check_header(meta: Any, path: Path) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: meta.json does not describe a graphsel checkpoint")
    v = meta.get("format_version")
    if type(v) is not int or v > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {v!r} was written by a newer graphsel "
                              f"({meta.get('graphsel_version')}); this is graphsel {__version__} (format "
                              f"{FORMAT_VERSION}): upgrade graphsel")
    return meta


def _decode_meta(doc: Any, dec: _Decoder, path: Path) -> GraphselMeta | None:
    if doc is None:
        return None
    try:
        meta = dec(doc, f"{path}: graphsel metadata")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed file: say which and why
        raise CheckpointError(f"{path}: malformed graphsel metadata: {type(e).__name__}: {e}") from e
    if not isinstance(meta, GraphselMeta):
        raise CheckpointError(f"{path}: the graphsel metadata is not a GraphselMeta")
    meta.version = new_version()       # versions key this process's analysis caches: never reuse one
    return meta


class ReportView:
    """What ``graphsel report`` needs of a checkpoint, read from ``meta.json`` alone: ``meta``
    (``{"graphsel": GraphselMeta}``), ``graph.nodes`` (a stand-in of the right length), the model
    class name. No tensor is read and no module is built."""

    def __init__(self, meta: GraphselMeta | None, nodes: int, class_name: str, info: dict):
        self.meta = {} if meta is None else {META_KEY: meta}
        self.graph = types.SimpleNamespace(nodes=range(nodes))
        self.class_name = class_name
        self.info = info


def read_report(path: str | os.PathLike | IO[bytes]) -> ReportView:
    """The pass history and metadata of a checkpoint, from ``meta.json`` only (tensors and
    modules are not read; classes are resolved only through the allowlist and shown by name
    otherwise)."""
    path = _source(path)
    with _open(path) as z:
        doc = _check_header(_read_json(z, META, path), path)
    dec = _Decoder(None, lenient=True)
    meta = _decode_meta(doc.get("graphsel"), dec, path)
    model = doc.get("model") if isinstance(doc.get("model"), dict) else {}
    nodes = model.get("nodes") if type(model.get("nodes")) is int else 0
    name = model.get("class_name") if isinstance(model.get("class_name"), str) else "?"
    return ReportView(meta, nodes, name, {k: doc.get(k) for k in ("format_version", "graphsel_version",
                                                                  "torch_version")})


def _source(f: Any) -> Any:
    return Path(f) if isinstance(f, (str, os.PathLike)) else f


def _open(path: Any) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a graphsel checkpoint: {e}") from e


def load_checkpoint(path: str | os.PathLike | IO[bytes], *, map_location: str | torch.device | None = "cpu",
                    propagate: bool = True) -> nn.Module:
    """The model saved by :func:`save_checkpoint` (see the module docstring for what runs).
    ``map_location``: where the tensors go (default CPU; None: the devices they were saved on).
    ``propagate``: run the model once on its stored example inputs to record shapes."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = _source(path)
    with _open(path) as z:
        meta_doc = _check_header(_read_json(z, META, path), path)
        graph_doc = _read_json(z, GRAPH, path)
        modules_doc = _read_json(z, MODULES, path)
        try:
            payload = st_load(z.read(TENSORS))
        except KeyError:
            raise CheckpointError(f"{path}: not a graphsel checkpoint (no {TENSORS})") from None
        except (SafetensorError, ValueError, OSError) as e:
            raise CheckpointError(f"{path}: {TENSORS} is not a valid safetensors file: {e}") from e
    if not isinstance(modules_doc, dict):
        raise CheckpointError(f"{path}: modules.json is malformed")
    device = None if map_location is None else torch.device(map_location)
    tensors = _TensorReader(modules_doc.get("tensors"), payload, device)
    dec = _Decoder(tensors)
    try:
        objs = _build_modules(modules_doc.get("modules"), dec)
        root = objs[0]
        if graph_doc is None:
            if modules_doc["modules"][0].get("class") == "fx.GraphModule":
                raise CheckpointError("the root is a GraphModule but graph.json holds no graph")
            model = root
        else:
            if modules_doc["modules"][0].get("class") != "fx.GraphModule":
                raise CheckpointError("graph.json holds a graph but the root is not a GraphModule")
            model = _graph_module(root, graph_doc, dec)
        meta = _decode_meta(meta_doc.get("graphsel"), _Decoder(tensors, objs, lenient=True), path)
    except CheckpointError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from e
    except Exception as e:  # noqa: BLE001 - a malformed file: say which and why
        raise CheckpointError(f"{path}: malformed graphsel checkpoint: {type(e).__name__}: {e}") from e
    if isinstance(model, fx.GraphModule):
        if meta is not None:
            model.meta[META_KEY] = meta
        inputs = model.meta.get(EXAMPLE_INPUTS_KEY)
        if propagate and inputs is not None and graph_doc.get("example_inputs_are_tensors"):
            from graphsel.ir.shapes import propagate_shapes

            try:
                propagate_shapes(model, inputs)
            except GraphselError as e:
                raise CheckpointError(f"{path}: the loaded model does not run on its stored example inputs: "
                                      f"{e}") from e
    return model


def _graph_module(holder: nn.Module, graph_doc: dict, dec: _Decoder) -> fx.GraphModule:
    graph, class_name = _build_graph(graph_doc, dec)
    dec.nodes = None
    spec = graph_doc.get("output_spec")
    if spec is not None:
        # resolved through pytree's registry of serialised type names only (types the process
        # registered itself, e.g. transformers' ModelOutputs once transformers is imported)
        try:
            graph._codegen = OutputTypeCodeGen(pytree.treespec_loads(spec))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"the graph's output type cannot be rebuilt ({type(e).__name__}: {e}); import "
                                  f"the library that defines it (e.g. transformers) before loading") from e
    try:
        gm = fx.GraphModule(holder, graph, class_name=class_name)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"the graph does not fit the modules: {type(e).__name__}: {e}") from e
    state = vars(holder)
    for k in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training"):
        setattr(gm, k, state[k]) if k == "training" else vars(gm).__setitem__(k, state[k])
    for k, v in state.items():
        if k not in _NN_MODULE_KEYS:
            vars(gm)[k] = v
    gm.graph.lint()
    gm._tracer_cls = gm.graph._tracer_cls = _tracers().get(graph_doc.get("tracer"))
    inputs = graph_doc.get("example_inputs")
    if inputs is not None:
        gm.meta[EXAMPLE_INPUTS_KEY] = tuple(_list(dec(inputs, "the example inputs"), None, "the example inputs"))
    extra = graph_doc.get("meta") or {}
    if not isinstance(extra, dict):
        raise CheckpointError("graph.json: malformed meta")
    for k, v in extra.items():
        gm.meta[k] = dec(v, f"gm.meta[{k!r}]")
    mark_compiled(gm)
    return gm
