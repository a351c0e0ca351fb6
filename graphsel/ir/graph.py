"""Small helpers for editing GraphModules (module replacement, use counts, cleanup)."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn


#: ``gm.meta`` key: the :func:`code_key` of the graph the module's code was last generated from
CODE_KEY = "graphsel_code_key"


def graph_fingerprint(gm: fx.GraphModule, modules: dict[str, nn.Module] | None = None) -> int:
    """A hash that changes whenever the graph or the shape of a called module changes: how the
    pipeline tells whether a pass changed a graph it did not say it changed. ``modules``:
    ``module_index(gm)``, when the caller has it."""
    modules = module_index(gm) if modules is None else modules
    items = []
    for n in gm.graph.nodes:
        extra: tuple = ()
        if n.op == "call_module":
            m = modules.get(n.target)
            if m is None:
                extra = ("<missing>",)
            elif m._modules:
                extra = (type(m).__name__,) + tuple(tuple(p.shape) for p in m.parameters(recurse=True))
            else:
                extra = (type(m).__name__,) + tuple(tuple(p.shape) for p in m._parameters.values() if p is not None)
        items.append((n.name, n.op, str(n.target), repr(n.args), repr(n.kwargs), extra))
    return hash(tuple(items))


def code_key(gm: fx.GraphModule) -> int:
    """A hash of everything torch.fx generates ``forward`` from: the nodes in order with their
    names, ops, targets, arguments and type annotations, and the graph's code generator. Unlike
    :func:`graph_fingerprint` it ignores the modules' shapes (slicing a module leaves the code as
    it is)."""
    g = gm.graph
    return hash((type(g._codegen).__qualname__,
                 tuple((n.name, n.op, str(n.target), repr(n.args), repr(n.kwargs), repr(n.type)) for n in g.nodes)))


def mark_compiled(gm: fx.GraphModule) -> None:
    """Record that ``gm``'s code was just generated from its graph (``gm.recompile()`` or the
    GraphModule constructor ran): the graph's :func:`code_key` and the code itself, whose identity
    tells whether anyone generated code since (a pass calling ``gm.recompile()`` on an
    intermediate graph, say)."""
    gm.meta[CODE_KEY] = (code_key(gm), gm._code)


def recompile(gm: fx.GraphModule) -> None:
    """``gm.recompile()`` unless the code it would generate is the code ``gm`` has: its graph's
    :func:`code_key` is the one recorded by :func:`mark_compiled` and nothing generated code since
    (materialize, say, slices modules without touching the graph)."""
    recorded = gm.meta.get(CODE_KEY)
    if not (recorded is not None and recorded[1] is getattr(gm, "_code", None) and recorded[0] == code_key(gm)):
        gm.recompile()
        mark_compiled(gm)


def module_index(root: nn.Module) -> dict[str, nn.Module]:
    """``dict(root.named_modules())`` (same order, duplicates removed) without the recursive
    generators: the pipeline and the analyses index modules many times per run."""
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        prefix, m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out[prefix] = m
        children = [(f"{prefix}.{name}" if prefix else name, c) for name, c in m._modules.items() if c is not None]
        stack.extend(reversed(children))
    return out


def module_tensors(index: dict[str, nn.Module]):
    """``(module path, registry, name, tensor)`` for every parameter, then buffer, of every module
    of a :func:`module_index`; ``registry`` is the module's ``_parameters`` or ``_buffers`` dict."""
    for path, m in index.items():
        for registry in (m._parameters, m._buffers):
            for name, t in registry.items():
                if t is not None:
                    yield path, registry, name, t


def split_path(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def replace_module(gm: fx.GraphModule, path: str, new: nn.Module, index: dict[str, nn.Module] | None = None) -> None:
    """Put ``new`` at dotted ``path`` (no recompile needed: call_module nodes look modules up by name).
    ``index``: a :func:`module_index` of ``gm`` to find the parent in (kept current)."""
    parent_path, name = split_path(path)
    parent = index.get(parent_path) if index is not None else None
    if parent is None:
        parent = gm.get_submodule(parent_path) if parent_path else gm
    if index is not None:
        index[path] = new
    if name in parent._modules:
        parent._modules[name] = new          # what nn.Module.__setattr__ does for a registered child
    else:
        setattr(parent, name, new)


def call_count(gm: fx.GraphModule, path: str) -> int:
    """How many call_module nodes call the module at ``path``."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == path)


def delete_unused_modules(gm: fx.GraphModule) -> None:
    """Remove submodules no node uses (parameters read with get_attr keep their module): torch.fx's
    ``delete_all_unused_submodules`` rules — a called module keeps its whole subtree, every
    ancestor of a used path stays — over one :func:`module_index`."""
    index = module_index(gm)
    used: set[str] = set()
    called: list[str] = []
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            parts = str(n.target).split(".")
            used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            if n.op == "call_module":
                called.append(str(n.target))
    if called:
        prefixes = tuple(f"{t}." for t in called)
        used.update(path for path in index if path.startswith(prefixes))
    for path in [p for p in index if p and p not in used]:
        gm.delete_submodule(path)


def unique_module_path(gm: fx.GraphModule, base: str) -> str:
    """A dotted path under ``base`` not used by any submodule yet (``base``, ``base_1``, ...)."""
    existing = module_index(gm)
    path, i = base, 1
    while path in existing or _attr_exists(gm, path):
        path, i = f"{base}_{i}", i + 1
    return path


def attribute_of(gm: nn.Module, path: str):
    """The object at dotted ``path`` (what a ``get_attr`` node reads), or None."""
    obj = gm
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _attr_exists(gm: nn.Module, path: str) -> bool:
    obj = gm
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def add_module(gm: fx.GraphModule, base: str, module: nn.Module) -> str:
    """Register ``module`` under a fresh path derived from ``base``; returns the path."""
    path = unique_module_path(gm, base)
    gm.add_submodule(path, module)
    return path
