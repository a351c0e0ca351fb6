"""``deepcopy_module``: ``copy.deepcopy`` for module trees, without the generic machinery's cost.

``copy.deepcopy(model)`` reconstructs every module through the pickle protocol: ``__reduce_ex__``,
a deep copy of the whole ``__dict__`` (a dozen hook dictionaries per module, almost all empty)
and ``__setstate__``. For a torchvision model that is 10⁴–10⁵ Python calls, as much time as
tracing it. This function produces the same result faster: for a module whose class keeps the
default protocol (no ``__deepcopy__``, ``__reduce_ex__``, ``__reduce__``, ``__getnewargs__`` or
``__getstate__`` of its own) it creates the object with ``cls.__new__``, copies the state that
``nn.Module.__getstate__`` returns value by value — atoms shared, empty containers recreated,
modules and plain dicts copied recursively, everything else through ``copy.deepcopy`` with the
shared memo — and calls the class's ``__setstate__`` as ``copy.deepcopy`` does. Any other object
is handed to ``copy.deepcopy``. Aliasing is preserved through the memo, which callers may seed (to
share tensors, say), exactly as with ``copy.deepcopy(model, memo)``. Unlike ``copy.deepcopy`` it
does not keep the originals alive in the memo: everything it copies is reachable from
``module``, which the caller holds for the duration of the call.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
import torch.nn as nn

_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout,
          torch.memory_format, type, range)
_DICTS = (dict, OrderedDict)
_PROTOCOL = ("__deepcopy__", "__copy__", "__reduce_ex__", "__reduce__", "__getnewargs__", "__getnewargs_ex__",
             "__getstate__")
_plain_cache: dict[type, bool] = {}
# nn.Module's own per-instance registries (hooks, ...): never shared between modules, so an empty
# one is recreated without a memo entry
_OWN_REGISTRIES = frozenset(k for k, v in vars(nn.Module()).items() if isinstance(v, (dict, set)))
_EMPTY_OK = (dict, OrderedDict, set)


def _default_protocol(cls: type) -> bool:
    """True when ``copy.deepcopy`` would copy instances of ``cls`` through nn.Module's defaults."""
    hit = _plain_cache.get(cls)
    if hit is None:
        hit = _plain_cache[cls] = all(
            getattr(cls, name, None) is getattr(nn.Module, name, None) for name in _PROTOCOL)
    return hit


def deepcopy_module(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """A deep copy of ``module`` equal to ``copy.deepcopy(module, memo)`` (see the module docstring)."""
    return _copy(module, {} if memo is None else memo)


def clone_memo(tensors, candidates) -> dict[int, torch.Tensor]:
    """Memo entries (for :func:`deepcopy_module`) that copy tensors of ``candidates`` with
    ``clone()``: what ``copy.deepcopy`` gives for a dense ``torch.Tensor`` that needs no grad,
    has no Python attributes and owns all of its storage, which no other tensor of ``tensors``
    (every tensor the copy will meet) shares — at a fraction of its cost (BatchNorm statistics,
    say). Anything else (views, shared storage, subclasses, Parameters) is left to the copier."""
    tensors = list(tensors)
    uses: dict[int, int] = {}
    for t in {id(t): t for t in tensors}.values():
        if t.layout is torch.strided and not t.is_quantized:
            ptr = t.untyped_storage().data_ptr()
            uses[ptr] = uses.get(ptr, 0) + 1
    memo: dict[int, torch.Tensor] = {}
    for t in candidates:
        if (type(t) is torch.Tensor and not t.requires_grad and t.layout is torch.strided and not t.is_quantized
                and not t.__dict__ and t.is_contiguous() and t.storage_offset() == 0
                and t.untyped_storage().nbytes() == t.numel() * t.element_size()
                and uses.get(t.untyped_storage().data_ptr()) == 1):
            memo[id(t)] = t.clone()
    return memo


def shallow_copy_module(module: nn.Module) -> nn.Module:
    """``copy.copy(module)`` with its own ``_parameters``, ``_buffers`` and ``_modules`` dicts
    (entries shared), so that assigning a tensor or submodule on the copy leaves ``module`` alone."""
    cls = type(module)
    if _default_protocol(cls):
        new = cls.__new__(cls)
        new.__setstate__(module.__getstate__())
    else:
        new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    return new


def _copy(obj: Any, memo: dict[int, Any]) -> Any:
    if type(obj) in _ATOMS:
        return obj
    hit = memo.get(id(obj), memo)
    if hit is not memo:
        return hit
    if isinstance(obj, torch.Tensor) and obj.grad_fn is not None:
        # a tensor derived from parameters under autograd (a cache an eval forward filled):
        # deepcopy refuses it; the copy holds it as a constant
        new = obj.detach().clone()
        memo[id(obj)] = new
        return new
    if isinstance(obj, nn.Module) and _default_protocol(type(obj)):
        cls = type(obj)
        new = cls.__new__(cls)
        memo[id(obj)] = new
        state = obj.__getstate__()
        new.__setstate__({k: (type(v)() if k in _OWN_REGISTRIES and not v and type(v) in _EMPTY_OK else _copy(v, memo))
                          for k, v in state.items()})
        return new
    if type(obj) in _DICTS:
        new = type(obj)()
        memo[id(obj)] = new
        for k, v in obj.items():
            if isinstance(v, torch.Tensor) and v.grad_fn is not None:
                continue              # a cache entry derived from parameters: the model rebuilds it
            new[_copy(k, memo)] = _copy(v, memo)
        return new
    if type(obj) is set and not obj:
        new = set()
        memo[id(obj)] = new
        return new
    if type(obj) is tuple and all(type(v) in _ATOMS for v in obj):
        return obj                                   # what copy.deepcopy returns for such tuples
    if isinstance(obj, nn.Module):
        _seed_derived_tensors(obj, memo)             # a module with its own copy protocol
        return copy.deepcopy(obj, memo)
    try:
        return copy.deepcopy(obj, memo)
    except Exception:  # noqa: BLE001 - not copyable (a lock, a handle, a generator): the copy shares it
        memo[id(obj)] = obj
        return obj


def _seed_derived_tensors(module: nn.Module, memo: dict[int, Any]) -> None:
    """Memo entries holding detached copies of the tensors derived under autograd that a module
    keeps in its attributes, so that ``copy.deepcopy`` of it does not refuse them."""
    stack = list(vars(module).values())
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            if v.grad_fn is not None and id(v) not in memo:
                memo[id(v)] = v.detach().clone()
        elif isinstance(v, (list, tuple, set)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
