"""Shape propagation: run the graph once on example inputs and record each node's tensor metadata
(what ``torch.fx.passes.shape_prop.ShapeProp`` records, at a fraction of its per-node cost)."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate, map_arg
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from graphsel.errors import ExampleInputError
from graphsel.ir.graph import module_index
from graphsel.ir.meta import InputSpec, graphsel_meta


def node_source(node: fx.Node) -> str:
    """A short description of where a node comes from: module path or function name."""
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"{node.op} {node.target}"


# innermost-first dimension orders of the memory formats (empty: every rank, last dim innermost)
_FORMAT_ORDERS = ((torch.contiguous_format, ()), (torch.channels_last, (1, 3, 2, 0)),
                  (torch.channels_last_3d, (1, 4, 3, 2, 0)))
_FORMATS = tuple(f for f, _ in _FORMAT_ORDERS)


def tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """torch.fx's ``_extract_tensor_metadata`` for the common case (a dense, unquantized tensor,
    whose memory format is found by ``is_contiguous`` checks), that function otherwise."""
    if t.is_quantized or t.layout is not torch.strided:
        return _extract_tensor_metadata(t)
    fmt = None
    for f in _FORMATS:
        try:
            if t.is_contiguous(memory_format=f):
                fmt = f
                break
        except RuntimeError:                 # a format that does not apply to this rank
            continue
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), fmt, False, {})


def _record(node: fx.Node, result: Any) -> None:
    """What torch's ShapeProp records: ``tensor_meta`` (mirroring the result's structure) when the
    result holds a tensor, and ``type``."""
    found = False

    def meta_of(obj: Any) -> Any:
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            return tensor_metadata(obj)
        return obj

    meta = map_aggregate(result, meta_of)
    if found:
        node.meta["tensor_meta"] = meta
    node.meta["type"] = type(result)


class _Propagation:
    """Runs the graph node by node, recording every result (torch.fx's ``ShapeProp`` semantics,
    without its ``Interpreter`` dispatch: this runs on every trace). Values are freed after their
    last use; ``current`` names the running node for error messages."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.current: fx.Node | None = None

    def run(self, *inputs: Any) -> Any:
        gm = self.gm
        modules = module_index(gm)
        nodes = list(gm.graph.nodes)
        last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(nodes):
            for a in n.all_input_nodes:
                last_use[a] = i
        dying: dict[int, list[fx.Node]] = {}
        for a, i in last_use.items():
            dying.setdefault(i, []).append(a)
        env: dict[fx.Node, Any] = {}
        load = env.__getitem__
        pending = iter(inputs)
        result = None
        for i, n in enumerate(nodes):
            self.current = n
            op = n.op
            if op == "placeholder":
                if str(n.target).startswith("*"):
                    result = list(pending)
                else:
                    result = next(pending, _MISSING)
                    if result is _MISSING:
                        if not n.args:
                            raise RuntimeError(f"expected an input for '{n.target}'")
                        result = n.args[0]
            elif op == "get_attr":
                result = gm
                for part in str(n.target).split("."):
                    result = getattr(result, part)
            elif op == "call_function":
                result = n.target(*map_arg(n.args, load), **map_arg(n.kwargs, load))
            elif op == "call_method":
                self_obj, *args = map_arg(n.args, load)
                result = getattr(self_obj, n.target)(*args, **map_arg(n.kwargs, load))
            elif op == "call_module":
                result = modules[n.target](*map_arg(n.args, load), **map_arg(n.kwargs, load))
            elif op == "output":
                result = map_arg(n.args[0], load)
            else:
                raise RuntimeError(f"unknown node op '{op}'")
            env[n] = result
            _record(n, result)
            for a in dying.get(i, ()):
                del env[a]
            if op == "output":
                return result
        return result


_MISSING = object()


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> Any:
    """Fill ``node.meta["tensor_meta"]`` (eval mode, no grad; the module's mode is restored).
    Returns the graph's output on ``example_inputs``."""
    _check_input_count(gm, example_inputs)
    all_modules = list(module_index(gm).values())
    was_training = [m.training for m in all_modules]
    gm.eval()
    prop = _Propagation(gm)
    try:
        with torch.no_grad():
            outputs = prop.run(*example_inputs)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        cause = e
        n = prop.current
        where = f" at node '{n.name}' ({node_source(n)})" if n is not None else ""
        shapes = ", ".join(str(InputSpec.of(t)) if isinstance(t, torch.Tensor) else type(t).__name__
                           for t in example_inputs)
        raise ExampleInputError(
            f"the example inputs ({shapes}) do not fit the model: running it failed{where}: "
            f"{type(cause).__name__}: {_first_line(cause)}. Pass example_inputs with the shape, dtype and "
            f"device the model expects (one tensor per forward argument).") from e
    finally:
        for m, t in zip(all_modules, was_training):
            m.training = t
    meta = graphsel_meta(gm)
    meta.inputs = [InputSpec.of(t) for t in example_inputs if isinstance(t, torch.Tensor)]
    return outputs


def _check_input_count(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """torch.fx's interpreter silently ignores extra inputs; say so instead."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]
    if not required and not placeholders:
        return
    if any(str(n.target).startswith("*") for n in placeholders):
        return
    if not len(required) <= len(example_inputs) <= len(placeholders):
        names = ", ".join(str(n.target) for n in placeholders)
        want = (f"{len(required)}" if len(required) == len(placeholders)
                else f"{len(required)} to {len(placeholders)}")
        raise ExampleInputError(
            f"the model's forward takes {want} input{'' if want == '1' else 's'} ({names}) but {len(example_inputs)} example inputs were "
            f"given; pass one tensor per forward argument (non-tensor arguments go in concrete_args=...).")


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else ""


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The recorded shape of a node's (tensor) output, or None."""
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        return None
    return tuple(tm.shape)


def resized_meta(tm: TensorMetadata, shape: tuple[int, ...]) -> TensorMetadata | None:
    """``tm`` for a tensor of ``shape`` laid out like the one ``tm`` describes (same order of
    dimensions in memory, dense), or None when that layout is not dense and non-overlapping
    (a strided slice, an expand): then only running the graph gives the layout."""
    shape = tuple(int(s) for s in shape)
    old_shape, old_stride = tuple(tm.shape), tuple(tm.stride)
    if shape == old_shape:
        return tm
    if len(shape) != len(old_shape):
        return None
    order = sorted(range(len(old_shape)), key=lambda d: (-old_stride[d], d))     # outermost first
    if not _dense_along(old_shape, old_stride, tuple(reversed(order))):
        return None
    stride = [0] * len(shape)
    step = 1
    for d in reversed(order):
        stride[d] = step
        step *= shape[d]
    fmt = next((f for f, inner in _FORMAT_ORDERS if len(inner) in (0, len(shape))
                and _dense_along(shape, stride, inner or tuple(reversed(range(len(shape)))))), None)
    return tm._replace(shape=torch.Size(shape), stride=tuple(stride), memory_format=fmt)


def _dense_along(shape: tuple[int, ...], stride: tuple[int, ...], inner_first: tuple[int, ...]) -> bool:
    """PyTorch's contiguity test for a layout whose dimensions, innermost first, are
    ``inner_first`` (size-1 dimensions are ignored; an empty tensor is contiguous)."""
    if 0 in shape:
        return True
    expect = 1
    for d in inner_first:
        if shape[d] != 1:
            if stride[d] != expect:
                return False
            expect *= shape[d]
    return True
