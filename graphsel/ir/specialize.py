"""Shape-specialised tracing: the fallback for forwards that branch on input shapes.

Symbolic tracing fails on code such as ``B, C, H, W = x.shape`` followed by ``if H != size:`` or
``for i in range(x.shape[1])`` — common in third-party models (CrossViT, NesT, HuggingFace
transformers). When the example inputs are known, the shapes are known: this tracer runs every
traced operation on real values as it records it (a *shadow* of each node), and every value that
is not a tensor — a size, a dimension count, a dtype, a Python number computed from them — comes
back as the concrete Python value instead of a proxy. The graph is then **specialised** to the
example inputs' shapes (recorded in the report and checked by graphsel's verification, which runs
inputs of the same shapes). Branches on tensor *values* are still refused: those depend on data,
not shapes.

Arguments of the root ``forward`` beyond the example inputs that have defaults (``labels=None``,
``return_dict=None``, ``output_hidden_states=None``) are fixed to their defaults, and an output
that is a registered pytree container other than tuple/list/dict (HuggingFace's ``ModelOutput``)
keeps its type through torch.fx's pytree code generator.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

_PLAIN_CONTAINERS = (tuple, list, dict)


def _static(value: Any) -> bool:
    """A value the tracer can bake into the graph: no tensor inside."""
    if isinstance(value, torch.Tensor):
        return False
    if isinstance(value, (list, tuple)):
        return all(_static(v) for v in value)
    if isinstance(value, dict):
        return all(_static(v) for v in value.values())
    return isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size,
                              torch.memory_format, torch.layout, slice, type(Ellipsis)))


class ShadowProxy(fx.Proxy):
    """A proxy whose node's value on the example inputs is known (``tracer.shadow[node]``)."""

    @property
    def shadow(self) -> Any:
        return self.tracer.shadow[self.node]

    def __getattr__(self, k: str):
        if k in ("node", "tracer") or k.startswith("__"):
            raise AttributeError(k)
        value = getattr(self.shadow, k)
        if callable(value) and not isinstance(value, torch.Tensor):
            return lambda *args, **kwargs: self.tracer.create_proxy("call_method", k, (self,) + args, kwargs)
        if _static(value):
            self.tracer.specialized = True
            return value
        return self.tracer.create_proxy("call_function", getattr, (self, k), {})

    def __len__(self):
        self.tracer.specialized = True
        return len(self.shadow)

    def __iter__(self):
        self.tracer.specialized = True
        return iter([self[i] for i in range(len(self.shadow))])

    def __bool__(self):
        raise fx.proxy.TraceError("the forward branches on a tensor's values (not only its shape): shape "
                                  "specialisation cannot trace it")

    def __index__(self):
        raise fx.proxy.TraceError("a tensor is used as a Python index")


def fixed_defaults(model: nn.Module, n_inputs: int, given: dict[str, Any] | None) -> dict[str, Any]:
    """``concrete_args`` fixing every ``forward`` argument after the first ``n_inputs`` to its
    default (the caller's own ``given`` values win)."""
    out = dict(given or {})
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return out
    for p in params[n_inputs:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in out:
            continue
        if p.default is not inspect.Parameter.empty:
            out[p.name] = p.default
    return out


SHIM_PREFIX = "graphsel_model"


def shim_root(model: nn.Module, n_inputs: int, fixed: dict[str, Any]) -> nn.Module:
    """A module whose ``forward`` takes the model's first ``n_inputs`` arguments by their names and
    calls the model with them and ``fixed``: a root torch.fx can bind (it mis-binds the arguments
    of forwards wrapped by decorators, such as HuggingFace's)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())[:n_inputs]
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []
    if len(names) != n_inputs or not all(n.isidentifier() and n != "self" for n in names):
        names = [f"input_{i}" for i in range(n_inputs)]
    arglist = ", ".join(names)
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {arglist}):\n    return self.{SHIM_PREFIX}({arglist}, **self.graphsel_fixed)\n",
         namespace)                                     # noqa: S102 - our own template, identifier names only
    shim = type("SpecializedRoot", (nn.Module,), {"forward": namespace["forward"]})()
    setattr(shim, SHIM_PREFIX, model)
    shim.graphsel_fixed = dict(fixed)
    return shim


def strip_shim(graph: fx.Graph) -> fx.Graph:
    """The graph with module and attribute targets relative to the model instead of the shim."""
    prefix = SHIM_PREFIX + "."
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr") and str(n.target).startswith(prefix):
            n.target = n.target[len(prefix):]
    return graph


def make_specializing(base: type) -> type:
    """A subclass of the tracer class ``base`` that traces with shadows (module docstring)."""

    class SpecializingTracer(base):
        def __init__(self, *args, example_inputs: tuple, **kwargs):
            super().__init__(*args, **kwargs)
            self.example_inputs = [t.detach().clone() for t in example_inputs]
            self.shadow: dict[fx.Node, Any] = {}
            self.specialized = False
            self._inputs_taken = 0
            self._evaluating = False      # running real values: module calls and attributes pass through

        def call_module(self, m, forward, args, kwargs):
            if self._evaluating:
                return forward(*args, **kwargs)
            return super().call_module(m, forward, args, kwargs)

        def getattr(self, attr, attr_val, parameter_proxy_cache):
            if self._evaluating:
                return attr_val
            return super().getattr(attr, attr_val, parameter_proxy_cache)

        def proxy(self, node: fx.Node) -> fx.Proxy:
            return ShadowProxy(node, self)

        def _value(self, a: Any) -> Any:
            return fx.node.map_aggregate(a, lambda x: self.shadow[x.node] if isinstance(x, fx.Proxy) else x)

        def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
            if kind == "placeholder":
                if str(target).startswith("**"):
                    return {}
                if str(target).startswith("*"):
                    return ()
                if self._inputs_taken < len(self.example_inputs):
                    self._inputs_taken += 1
                    return self.example_inputs[self._inputs_taken - 1]
                return args[0] if args else None
            a, kw = self._value(args), self._value(kwargs)
            self._evaluating = True
            try:
                if kind == "get_attr":
                    obj: Any = self.root
                    for part in target.split("."):
                        obj = getattr(obj, part)
                    return obj.detach().clone() if isinstance(obj, torch.Tensor) else obj
                with torch.no_grad():
                    if kind == "call_module":
                        return self.root.get_submodule(target)(*a, **kw)
                    if kind == "call_function":
                        return target(*a, **kw)
                    return getattr(a[0], target)(*a[1:], **kw)
            finally:
                self._evaluating = False

        def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
            value = self._evaluate(kind, target, args, kwargs)
            if kind in ("call_function", "call_method") and _static(value):
                self.specialized = True
                return value                       # a shape-derived Python value: baked in
            # no proxy factories (parameter/buffer proxies): every proxy answers from its shadow
            proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, None)
            self.shadow[proxy.node] = value
            return proxy

    return SpecializingTracer


class OutputTypeCodeGen(fx.graph.CodeGen):
    """torch.fx code generation whose ``forward`` (and interpreters, through ``process_outputs``)
    rebuilds the output container from the graph's flat list of outputs."""

    def __init__(self, out_spec: pytree.TreeSpec):
        super().__init__()
        self.out_spec = out_spec

        def graphsel_rebuild_output(outputs):
            return pytree.tree_unflatten(list(outputs), out_spec)
        self.rebuild = graphsel_rebuild_output

    def generate_output(self, output_args, **kwargs) -> str:
        return f"return graphsel_rebuild_output({output_args!r})"

    def process_outputs(self, outputs: Any) -> Any:
        return self.rebuild(outputs)

    def additional_globals(self) -> list[tuple[str, Any]]:
        return [("graphsel_rebuild_output", self.rebuild)]


def keep_output_type(graph: fx.Graph, output_value: Any, n_inputs: int) -> bool:
    """When ``output_value`` (the model's output on the example inputs) is a pytree container
    other than tuple/list/dict — a dataclass-like ``ModelOutput`` — make the graph return its
    leaves and rebuild the container in the generated code. True when it did."""
    if isinstance(output_value, torch.Tensor) or type(output_value) in _PLAIN_CONTAINERS:
        return False
    leaves, spec = pytree.tree_flatten(output_value)
    if spec.type in _PLAIN_CONTAINERS or not leaves:
        return False
    out = next(n for n in graph.nodes if n.op == "output")
    nodes = pytree.tree_leaves(out.args[0], is_leaf=lambda x: isinstance(x, fx.Node))
    if len(nodes) != len(leaves):
        return False
    out.args = (list(nodes),)
    graph._codegen = OutputTypeCodeGen(spec)
    return True


def run_model(model: nn.Module, inputs: tuple, concrete_args: dict[str, Any]) -> Any:
    """``model(*inputs, **concrete_args)`` in eval mode without grad (the output to keep the type of)."""
    with torch.no_grad():
        return model(*inputs, **concrete_args)


