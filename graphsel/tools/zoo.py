"""Model loading by name, and graphsel checkpoints.

``load_model(spec, **kwargs)`` understands:

* ``torchvision:NAME``: a torchvision model, randomly initialised (``weights=None``; nothing is downloaded);
* ``timm:NAME``: a timm model, randomly initialised (``pretrained=False``);
* ``graphsel:NAME``: a network bundled in :mod:`graphsel.models` (``graphsel:densenet_cifar``);
* ``package.module:factory``: imports the module and calls ``factory(**kwargs)``;
* a file path: a graphsel checkpoint (:func:`save`), or a module or GraphModule saved with
  ``torch.save``. **Loading a file unpickles code** (``torch.load(..., weights_only=False)``):
  load only files you trust.

Every failure is a :class:`ModelSpecError` whose message says what was wrong and how to fix it.
"""
from __future__ import annotations

import difflib
import importlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from graphsel.errors import GraphselError

CHECKPOINT_FORMAT = "graphsel.GraphModule"
CHECKPOINT_VERSION = 1
SPEC_HELP = ("give torchvision:NAME, timm:NAME, graphsel:NAME, package.module:factory, or the path of a "
             "saved model file")


class ModelSpecError(GraphselError, ValueError):
    """A model specification that cannot be loaded."""


def load_model(spec: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """The model named by ``spec`` (see the module docstring); ``kwargs`` go to the factory."""
    if isinstance(spec, os.PathLike):
        return load_file(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"model spec must be a non-empty string, got {spec!r}: {SPEC_HELP}")
    spec = spec.strip()
    if _looks_like_path(spec):
        return load_file(spec)
    if ":" not in spec:
        raise ModelSpecError(f"cannot read model spec '{spec}': no such file, and no 'source:name' form; {SPEC_HELP}")
    source, _, name = spec.partition(":")
    if not name:
        raise ModelSpecError(f"model spec '{spec}' names no model after '{source}:'; {SPEC_HELP}")
    loader = {"torchvision": _torchvision, "tv": _torchvision, "timm": _timm, "graphsel": _graphsel}.get(source)
    if loader is not None:
        return loader(name, kwargs)
    return _factory(source, name, kwargs)


def _looks_like_path(spec: str) -> bool:
    if os.path.exists(spec):
        return True
    return spec.endswith((".pt", ".pth", ".pkl", ".pt2", ".bin")) or os.sep in spec.split(":")[0]


def _closest(name: str, names: list[str], n: int = 5) -> str:
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
    return f" Closest: {', '.join(close)}." if close else ""


def _torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import torchvision.models as tvm
    except ImportError as e:
        raise ModelSpecError("torchvision is not installed: pip install torchvision") from e
    names = sorted(tvm.list_models())
    if name not in names:
        raise ModelSpecError(f"torchvision has no model '{name}'.{_closest(name, names)} "
                             f"All {len(names)} names: torchvision.models.list_models().")
    kwargs = dict(kwargs)
    if kwargs.pop("weights", None) is not None:
        raise ModelSpecError("graphsel loads torchvision models randomly initialised (weights=None); "
                             "load pretrained weights yourself and pass the module")
    return _call(f"torchvision:{name}", lambda: tvm.get_model(name, weights=None, **kwargs))


def _timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError as e:
        raise ModelSpecError("timm is not installed: pip install timm (or pip install 'graphsel[bench]')") from e
    names = timm.list_models()
    if name not in names:
        raise ModelSpecError(f"timm has no model '{name}'.{_closest(name, names)} See timm.list_models('*{name[:4]}*').")
    kwargs = dict(kwargs)
    if kwargs.pop("pretrained", False):
        raise ModelSpecError("graphsel loads timm models randomly initialised (pretrained=False)")
    return _call(f"timm:{name}", lambda: timm.create_model(name, pretrained=False, **kwargs))


def _graphsel(name: str, kwargs: dict[str, Any]) -> nn.Module:
    from graphsel.tools import models

    names = sorted(n for n in models.__all__ if n[0].islower() and callable(getattr(models, n)))
    if name not in names:
        raise ModelSpecError(f"graphsel.models has no model '{name}'.{_closest(name, names)} "
                             f"Bundled models: {', '.join(names)}.")
    return _call(f"graphsel:{name}", lambda: getattr(models, name)(**kwargs))


def _factory(module_name: str, attr: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ModelSpecError(f"cannot import '{module_name}' (model spec '{module_name}:{attr}'): no module "
                                 f"named '{e.name}'. Is it installed and on PYTHONPATH? {SPEC_HELP}") from e
        raise ModelSpecError(f"importing '{module_name}' failed: {e}") from e
    except Exception as e:  # noqa: BLE001
        raise ModelSpecError(f"importing '{module_name}' failed: {type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(module) if not n.startswith("_")]
            raise ModelSpecError(f"module '{module_name}' has no attribute '{attr}'.{_closest(attr, public)}")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelSpecError(f"'{module_name}:{attr}' is a {type(obj).__name__}, not a model factory or module")
    return _call(f"{module_name}:{attr}", lambda: obj(**kwargs))


def _call(spec: str, make) -> nn.Module:
    try:
        model = make()
    except TypeError as e:
        raise ModelSpecError(f"'{spec}' does not accept these arguments: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"'{spec}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model


# ================================================================================================
# files

def save(gm: nn.Module, path: str | os.PathLike) -> Path:
    """Save a graphsel GraphModule with its pass history and metadata (``torch.save`` alone drops
    ``GraphModule.meta`` on load). Loading needs graphsel: :func:`load_model` or :func:`load_file`.
    For deployment without graphsel use :func:`graphsel.export`."""
    if not isinstance(gm, nn.Module):
        raise TypeError(f"graphsel.save expects a torch.nn.Module, got {type(gm).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(getattr(gm, "meta", {}) or {})
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "module": gm, "meta": meta}, path)
    return path


def load_file(path: str | os.PathLike) -> nn.Module:
    """A model from a file: a graphsel checkpoint (metadata restored) or a ``torch.save``d module.
    This unpickles code: load only files you trust."""
    path = Path(path)
    if not path.exists():
        raise ModelSpecError(f"no such model file: {path}")
    if path.is_dir():
        raise ModelSpecError(f"{path} is a directory; give the model file inside it")
    if path.suffix == ".pt2":
        try:
            return torch.export.load(str(path)).module()
        except Exception as e:  # noqa: BLE001
            raise ModelSpecError(f"cannot load {path} with torch.export.load: {type(e).__name__}: {e}") from e
    try:
        obj = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001
        try:  # a TorchScript archive
            return torch.jit.load(str(path), map_location="cpu")
        except Exception:  # noqa: BLE001
            pass
        raise ModelSpecError(f"cannot load {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                             f"graphsel reads files written by graphsel.save or torch.save(model)") from e
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        module = obj["module"]
        if isinstance(module, fx.GraphModule):
            module.meta.update(obj.get("meta") or {})
        return module
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelSpecError(f"{path} holds a state_dict (tensors only), not a model: build the model, call "
                             f"load_state_dict, and pass the module (or save it with torch.save(model))")
    raise ModelSpecError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")
