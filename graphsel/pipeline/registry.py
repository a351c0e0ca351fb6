"""The pass registry: passes are named, so pipelines can be data (``"fuse_bn"``,
``("prune", {"ratio": 0.5})``, ``"insert_selective_conv,fold_masks,materialize"``)."""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Iterable

from graphsel.pipeline.passbase import Contract, Pass

_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a :class:`Pass` subclass available by its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"register_pass expects a Pass subclass, got {cls!r}")
    if not cls.name or not cls.name.isidentifier():
        raise ValueError(f"{cls.__name__}.name must be a non-empty identifier, got {cls.name!r}")
    if not isinstance(cls.contract, Contract):
        raise TypeError(f"{cls.__name__}.contract must be a graphsel.Contract, got {cls.contract!r}")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"pass name '{cls.name}' is taken by {other.__module__}.{other.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def available_passes() -> dict[str, type[Pass]]:
    """Registered passes by name (``import graphsel`` registers the built-in library)."""
    return dict(sorted(_REGISTRY.items()))


def pass_options(cls: type[Pass]) -> dict[str, Any]:
    """The keyword options of a pass class with their defaults (``inspect.Parameter.empty`` when required)."""
    sig = inspect.signature(cls.__init__)
    return {n: p.default for n, p in sig.parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _unknown(name: str) -> ValueError:
    names = list(available_passes())
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ValueError(f"unknown pass '{name}'.{hint} Registered passes: {', '.join(names)}.")


def resolve_pass(spec: Any) -> Pass:
    """A :class:`Pass` from an instance, a Pass class, a name, or a ``(name, {options})`` pair."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, type) and issubclass(spec, Pass):
        return spec()
    options: dict[str, Any] = {}
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        spec, options = spec
    if isinstance(spec, str):
        name = spec.strip()
        cls = available_passes().get(name)
        if cls is None:
            raise _unknown(name)
        allowed = pass_options(cls)
        bad = [k for k in options if k not in allowed]
        if bad:
            raise TypeError(f"pass '{name}' has no option {', '.join(map(repr, bad))}; "
                            f"its options are: {', '.join(allowed) or '(none)'}.")
        return cls(**options)
    raise TypeError(
        f"cannot use {spec!r} ({type(spec).__name__}) as a pass: give a graphsel.Pass instance, a registered "
        f"name such as 'fuse_bn', or a (name, {{options}}) pair.")


def resolve_passes(specs: Any) -> list[Pass]:
    """Resolve a pipeline: a list of pass specs, one spec, or a comma-separated string of names."""
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    elif isinstance(specs, (Pass, tuple)) or (isinstance(specs, type) and issubclass(specs, Pass)):
        specs = [specs] if not (isinstance(specs, tuple) and not (len(specs) == 2 and isinstance(specs[1], dict))) else list(specs)
    if not isinstance(specs, Iterable):
        raise TypeError(f"passes must be a list of passes or pass names, got {type(specs).__name__}")
    return [resolve_pass(s) for s in specs]
