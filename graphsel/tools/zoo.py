"""Model loading by name, and graphsel checkpoints.

``load_model(spec, **kwargs)`` understands:

* ``torchvision:NAME``: a torchvision model, randomly initialised (``weights=None``; nothing is downloaded);
* ``timm:NAME``: a timm model, randomly initialised (``pretrained=False``);
* ``graphsel:NAME``: a network bundled in :mod:`graphsel.models` (``graphsel:densenet_cifar``);
* ``package.module:factory``: imports the module and calls ``factory(**kwargs)``;
* any of these with ``weights=PATH``: the model, then its state dict from ``PATH`` (a
  ``torch.save``d state dict read with ``torch.load(weights_only=True)``, or a ``.safetensors`` file);
* a file path: a graphsel checkpoint (:func:`save`; data only, see :mod:`graphsel.tools.checkpoint`).

**Nothing loaded from a file runs code from it** unless the caller says ``trust_pickle=True``
(CLI: ``--trust-pickle``): a file that needs full unpickling (a ``torch.save``d module, an old
pickle checkpoint), a ``torch.export`` archive (``.pt2``: ``torch.export.load`` unpickles and
evaluates shape expressions) or a TorchScript archive (its code runs) is refused with an
:class:`UntrustedFileError` that names the risk and the opt-in. A state dict is read with
``torch.load(weights_only=True)``; it holds no model, so the error says how to load it into one.

Every failure is a :class:`ModelSpecError` whose message says what was wrong and how to fix it.
"""
from __future__ import annotations

import difflib
import importlib
import os
import pickle
import warnings
from pathlib import Path
from typing import IO, Any

import torch
import torch.fx as fx
import torch.nn as nn

from graphsel.errors import GraphselError
from graphsel.tools.checkpoint import CheckpointError  # noqa: F401 - re-exported: save's errors
from graphsel.tools.checkpoint import SUFFIX, is_checkpoint, load_checkpoint, save_checkpoint

#: the old checkpoint format (a pickle): written by save(..., trust_pickle=True), read with trust_pickle=True
CHECKPOINT_FORMAT = "graphsel.GraphModule"
CHECKPOINT_VERSION = 1
SPEC_HELP = ("give torchvision:NAME, timm:NAME, graphsel:NAME, package.module:factory, or the path of a "
             "saved model file")
TRUST_HINT = ("if you trust the file and where it came from, pass trust_pickle=True to graphsel.load_model "
              "(CLI: --trust-pickle)")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


class ModelSpecError(GraphselError, ValueError):
    """A model specification that cannot be loaded."""


class UntrustedFileError(ModelSpecError):
    """A file that can only be loaded by running code from it (full unpickling, a torch.export or
    TorchScript archive) and the caller did not say ``trust_pickle=True``."""


def load_model(spec: str | os.PathLike, *, trust_pickle: bool = False, **kwargs: Any) -> nn.Module:
    """The model named by ``spec`` (see the module docstring); ``kwargs`` go to the factory.

    ``weights=PATH`` (a state dict file) loads the state dict into the model built from ``spec``,
    with ``torch.load(weights_only=True)``. ``trust_pickle=True`` allows files that run code when
    loaded (pickled modules, old pickle checkpoints, ``.pt2`` and TorchScript archives): only for
    files you trust."""
    weights = kwargs.get("weights")
    if weights is not None and _is_weights_file(weights):
        kwargs.pop("weights")
        if isinstance(spec, os.PathLike) or (isinstance(spec, str) and _looks_like_path(spec.strip())):
            raise ModelSpecError(f"weights={weights!s} loads a state dict into a model named by source:name "
                                 f"(torchvision:NAME, timm:NAME, ...); {spec!s} is a file")
        model = load_model(spec, **kwargs)
        load_weights(model, weights, trust_pickle=trust_pickle)
        return model
    if isinstance(spec, os.PathLike):
        return load_file(spec, trust_pickle=trust_pickle)
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"model spec must be a non-empty string, got {spec!r}: {SPEC_HELP}")
    spec = spec.strip()
    if _looks_like_path(spec):
        return load_file(spec, trust_pickle=trust_pickle)
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
    return spec.endswith((".pt", ".pth", ".pkl", ".pt2", ".bin", SUFFIX, ".safetensors")) or \
        os.sep in spec.split(":")[0]


def _is_weights_file(weights: Any) -> bool:
    """``weights=`` names a file (not a torchvision weights enum or name such as "DEFAULT")."""
    if isinstance(weights, os.PathLike):
        return True
    return isinstance(weights, str) and (os.path.exists(weights) or weights.endswith(_WEIGHT_SUFFIXES)
                                         or os.sep in weights)


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

def save(gm: nn.Module, path: str | os.PathLike | IO[bytes], *, trust_pickle: bool = False) -> Path:
    """Save a model — a graphsel GraphModule with its pass history, masks and example inputs, any
    GraphModule, or an ``nn.Module`` of allowlisted classes — as a graphsel checkpoint: data only
    (JSON and safetensors in a zip, see :mod:`graphsel.tools.checkpoint`), loaded by
    :func:`load_model` without running code from the file. The suggested suffix is ``.graphsel``.

    Anything that cannot be described as data (a lambda attribute, a function of ``__main__``, a
    hook) is a :class:`~graphsel.tools.checkpoint.CheckpointError` naming its module path and
    attribute. ``trust_pickle=True`` writes the old pickle format instead (``torch.save``; loading
    it runs code and needs ``trust_pickle=True``); its file name must not end in ``.graphsel``.
    For deployment without graphsel use :func:`graphsel.export`."""
    if not isinstance(gm, nn.Module):
        raise TypeError(f"graphsel.save expects a torch.nn.Module, got {type(gm).__name__}")
    if not isinstance(path, (str, os.PathLike)) and hasattr(path, "write") and not trust_pickle:
        return save_checkpoint(gm, path)     # a binary file object
    path = Path(path)
    if not trust_pickle:
        return save_checkpoint(gm, path)
    if path.name.endswith(SUFFIX):
        raise ModelSpecError(f"{path}: '{SUFFIX}' files are graphsel's data-only checkpoints; name a pickle "
                             f"checkpoint '*.graphsel.pt' (or drop trust_pickle=True to write the safe format)")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(getattr(gm, "meta", {}) or {})
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "module": gm, "meta": meta}, path)
    return path


def load_file(path: str | os.PathLike, *, trust_pickle: bool = False,
              map_location: str | torch.device | None = "cpu") -> nn.Module:
    """A model from a file.

    * a graphsel checkpoint (by content, whatever its name): the safe loader;
    * ``.pt2`` (torch.export) and TorchScript archives: only with ``trust_pickle=True``
      (``torch.export.load`` unpickles weights and constants and evaluates shape expressions;
      TorchScript runs the archive's code);
    * anything else: ``torch.load(weights_only=True)``. A file that needs more (a pickled module,
      an old pickle checkpoint) is an :class:`UntrustedFileError` naming the globals it would
      import, unless ``trust_pickle=True``; a state dict is a :class:`ModelSpecError` saying how to
      load it into its model (``load_model("torchvision:resnet18", weights=path)``).
    """
    path = Path(path)
    if not path.exists():
        raise ModelSpecError(f"no such model file: {path}")
    if path.is_dir():
        raise ModelSpecError(f"{path} is a directory; give the model file inside it")
    if is_checkpoint(path):
        return load_checkpoint(path, map_location=map_location)
    if path.suffix == ".pt2" or _is_pt2_archive(path):
        if not trust_pickle:
            raise UntrustedFileError(
                f"{path} is a torch.export archive: torch.export.load unpickles its weights and constants "
                f"(arbitrary code can run) and evaluates the shape expressions it holds; {TRUST_HINT}")
        try:
            return torch.export.load(str(path)).module()
        except Exception as e:  # noqa: BLE001
            raise ModelSpecError(f"cannot load {path} with torch.export.load: {type(e).__name__}: {e}") from e
    if path.suffix == ".safetensors":
        _state_dict_error(path)
    if trust_pickle:
        return _load_pickle(path, map_location)
    try:
        with warnings.catch_warnings():      # "Detected pickle protocol 4 ...": a raw pickle, refused below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ModelSpecError(f"cannot load {path}: not a model file ({_first_line(e)}). graphsel reads "
                                 f"graphsel checkpoints (graphsel.save) and state dicts (with weights=)") from e
        raise UntrustedFileError(
            f"{path} is a full pickle{_needed_globals(path)}: loading it would run code from the file (a "
            f"malicious file can do anything your account can); graphsel loads only data by default "
            f"(graphsel checkpoints: graphsel.save, *{SUFFIX}; state dicts with weights=); {TRUST_HINT}") from e
    except RuntimeError as e:
        if "TorchScript" in str(e):
            raise UntrustedFileError(f"{path} is a TorchScript archive: loading it runs the TorchScript code it "
                                     f"holds; {TRUST_HINT}") from e
        raise ModelSpecError(f"cannot load {path}: {_first_line(e)}. graphsel reads graphsel checkpoints "
                             f"(graphsel.save) and state dicts (with weights=)") from e
    except Exception as e:  # noqa: BLE001
        raise ModelSpecError(f"cannot load {path}: {type(e).__name__}: {_first_line(e)}. graphsel reads graphsel "
                             f"checkpoints (graphsel.save) and state dicts (with weights=)") from e
    if _state_dict_of(obj) is not None:
        _state_dict_error(path)
    raise ModelSpecError(f"{path} holds a {type(obj).__name__}, not a model")


def _load_pickle(path: Path, map_location) -> nn.Module:
    """The old behaviour, for files the caller trusts: full unpickling (and TorchScript)."""
    try:
        obj = torch.load(path, weights_only=False, map_location=map_location)
    except Exception as e:  # noqa: BLE001
        try:  # a TorchScript archive
            return torch.jit.load(str(path), map_location=map_location)
        except Exception:  # noqa: BLE001
            pass
        raise ModelSpecError(f"cannot load {path}: {type(e).__name__}: {_first_line(e)}. graphsel reads files "
                             f"written by graphsel.save or torch.save(model)") from e
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        module = obj["module"]
        if isinstance(module, fx.GraphModule):
            module.meta.update(obj.get("meta") or {})
        return module
    if isinstance(obj, nn.Module):
        return obj
    if _state_dict_of(obj) is not None:
        _state_dict_error(path)
    raise ModelSpecError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")


def _state_dict_error(path: Path) -> None:
    raise ModelSpecError(
        f"{path} holds a state_dict (weights only), not a model: load it into the model it belongs to, e.g. "
        f"graphsel.load_model('torchvision:resnet18', weights='{path}') (CLI: MODEL --weights {path})")


def _state_dict_of(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state dict ``obj`` is or wraps (``{"state_dict": ...}``, ``{"model": ...}``), or None."""
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    return None


def load_weights(model: nn.Module, path: str | os.PathLike, *, trust_pickle: bool = False) -> nn.Module:
    """Load the state dict in ``path`` into ``model`` (strict): a ``.safetensors`` file, or a
    ``torch.save``d state dict read with ``torch.load(weights_only=True)`` (``trust_pickle=True``:
    full unpickling, for files you trust). A ``{"state_dict": ...}`` wrapper and the ``module.``
    prefix of DataParallel are removed."""
    path = Path(path)
    if not path.is_file():
        raise ModelSpecError(f"no such weights file: {path}")
    if is_checkpoint(path):
        raise ModelSpecError(f"{path} is a graphsel checkpoint (a whole model): load it with "
                             f"graphsel.load_model('{path}'), without weights=")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file as st_load_file

            obj = st_load_file(str(path))
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                obj = torch.load(path, weights_only=not trust_pickle, map_location="cpu")
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise ModelSpecError(f"cannot read weights file {path}: {_first_line(e)}") from e
        raise UntrustedFileError(f"weights file {path} is not a plain state dict{_needed_globals(path)}: loading "
                                 f"it would run code from the file; {TRUST_HINT}") from e
    except Exception as e:  # noqa: BLE001
        raise ModelSpecError(f"cannot read weights file {path}: {type(e).__name__}: {_first_line(e)}") from e
    state = _state_dict_of(obj)
    if state is None and isinstance(obj, nn.Module):
        state = obj.state_dict()
    if state is None:
        raise ModelSpecError(f"weights file {path} holds a {type(obj).__name__}, not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise ModelSpecError(f"weights file {path} does not fit {type(model).__name__}: {detail[:600]}") from e
    return model


def _needed_globals(path: Path) -> str:
    """``" (it imports os.system, ...)"``: what unpickling would import, read without unpickling."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: scan the raw pickle
        names = _pickle_globals(path)
    if not names:
        return ""
    shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
    return f" (unpickling it imports {shown})"


def _pickle_globals(path: Path) -> list[str]:
    import pickletools

    try:
        data = path.read_bytes()
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
        return sorted(set(found))
    except Exception:  # noqa: BLE001
        return []


def _is_pt2_archive(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(("serialized_exported_program.json", "archive_format")) or
                       "/models/" in n and n.endswith(".json") for n in z.namelist()[:64])
    except (OSError, zipfile.BadZipFile):
        return False


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__

