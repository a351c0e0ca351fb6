"""Module selection, the same in every pass: ``include=`` and ``exclude=`` take a qualified module
name or glob (``"layer1.0.conv1"``, ``"layer4.*"``, matched with ``fnmatch``), a module class
(``nn.Conv2d``: that class and its subclasses), a list mixing those, or a predicate
``fn(path, module) -> bool``. A module is selected when ``include`` (if given) matches it and
``exclude`` does not."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Iterable

import torch.nn as nn

from graphsel.errors import GraphselError

_GLOB = set("*?[")


class ModuleSelection:
    """The parsed ``include`` / ``exclude`` options of a pass (``owner``: the pass, for messages)."""

    def __init__(self, include: Any = None, exclude: Any = None, owner: str = "pass"):
        self.owner = owner
        self.include = self._parse(include, "include")
        self.exclude = self._parse(exclude, "exclude")

    def _parse(self, rule: Any, what: str) -> list | None:
        if rule is None:
            return None
        items = [rule] if isinstance(rule, (str, type)) or callable(rule) and not isinstance(rule, type) else rule
        if not isinstance(items, Iterable):
            raise TypeError(f"{self.owner}: {what} must be a module name or glob, a module class, a list of them, "
                            f"or a predicate fn(path, module) -> bool; got {rule!r}")
        out = []
        for it in items:
            if isinstance(it, str) or (isinstance(it, type) and issubclass(it, nn.Module)) or \
                    (callable(it) and not isinstance(it, type)):
                out.append(it)
            else:
                raise TypeError(f"{self.owner}: {what} holds {it!r}; give module names or globs (str), module "
                                f"classes, or a predicate fn(path, module) -> bool")
        return out

    @staticmethod
    def _matches(rules: list, path: str, module: nn.Module) -> bool:
        for r in rules:
            if isinstance(r, str):
                if path == r or (_GLOB & set(r) and fnmatch.fnmatchcase(path, r)):
                    return True
            elif isinstance(r, type):
                if isinstance(module, r):
                    return True
            elif r(path, module):
                return True
        return False

    def why_not(self, path: str, module: nn.Module) -> str | None:
        """None when ``path`` is selected, else why not."""
        if self.include is not None and not self._matches(self.include, path, module):
            return "not selected by include"
        if self.exclude is not None and self._matches(self.exclude, path, module):
            return "excluded"
        return None

    def selects(self, path: str, module: nn.Module) -> bool:
        return self.why_not(path, module) is None

    def excluded(self, path: str, module: nn.Module) -> bool:
        return self.exclude is not None and self._matches(self.exclude, path, module)

    @property
    def active(self) -> bool:
        return self.include is not None or self.exclude is not None

    def names(self, which: str = "include") -> list[str]:
        """The exact module names (no glob) given in ``include`` or ``exclude``."""
        rules = getattr(self, which) or []
        return [r for r in rules if isinstance(r, str) and not (_GLOB & set(r))]

    def check_names(self, modules: dict[str, nn.Module], kind: Callable[[nn.Module], bool] | None = None) -> None:
        """Every exact name given must be a module of the model (of ``kind``, when given); a glob
        must match at least one: otherwise a :class:`GraphselError` naming the closest ones."""
        candidates = [p for p, m in modules.items() if p and (kind is None or kind(m))]
        for which in ("include", "exclude"):
            for r in getattr(self, which) or []:
                if not isinstance(r, str):
                    continue
                glob = bool(_GLOB & set(r))
                if (glob and any(fnmatch.fnmatchcase(p, r) for p in candidates)) or (not glob and r in modules):
                    continue
                close = difflib.get_close_matches(r, candidates, n=3)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                what = "matches no module" if glob else "is not a module"
                raise GraphselError(f"{self.owner}: {which}={r!r} {what} of this model.{hint}")
