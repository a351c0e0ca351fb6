"""Pieces of a traced graph as GraphModules that share the graph's modules: the *prefix* that
computes a layer's input (and whatever else the rest of its segment reads) from the model inputs,
and the *suffix* that runs from the layer's output to its segment's classifier. Selection runs the
prefix once per batch and the suffix once per batch and step, never the whole model per candidate.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from graphsel.ir.graph import module_index

from .pivots import ancestors, descendants


def extract(gm: fx.GraphModule, inputs: Sequence[fx.Node], outputs: Sequence[fx.Node],
            model_inputs: bool = False) -> fx.GraphModule:
    """A GraphModule computing ``outputs`` (a tuple) from ``inputs``, which become its
    placeholders; with ``model_inputs`` every placeholder of ``gm`` follows (all of them, in
    order, so that a prefix is called like the model). Nodes of ``gm`` that ``outputs`` need and
    ``inputs`` do not cut off are copied; modules and attributes are shared with ``gm``."""
    cut = set(inputs)
    needed: set[fx.Node] = set()
    stack = list(outputs)
    while stack:
        n = stack.pop()
        if n in needed or n in cut:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(inputs):
        env[n] = g.placeholder(f"cut_{i}_{n.name}")
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n not in cut:
            if not model_inputs and n in needed:
                raise ValueError(f"the piece of the graph needs model input '{n.name}'; cut it off")
            if model_inputs:
                env[n] = g.node_copy(n)
        elif n in needed and n.op != "output":
            env[n] = g.node_copy(n, lambda x: env[x])
    g.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(gm, g)


_INPLACE_FUNCTIONS = {"iadd", "isub", "imul", "itruediv", "relu_", "add_", "mul_"}


def mutates_first_argument(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """The node writes into its first argument (``x += y``, ``x.relu_()``, ``nn.ReLU(inplace=True)``,
    ``F.relu(x, inplace=True)``)."""
    if n.op == "call_module":
        return bool(getattr(modules.get(n.target), "inplace", False))
    if n.op == "call_method":
        return isinstance(n.target, str) and n.target.endswith("_") and not n.target.startswith("_")
    if n.op == "call_function":
        name = getattr(n.target, "__name__", "")
        return name in _INPLACE_FUNCTIONS or name.endswith("_") and not name.startswith("_") or \
            bool(n.kwargs.get("inplace", False))
    return False


class Segment:
    """What the loss of one layer needs from a graph: ``layer`` (a call_module node) and ``target``
    (the node giving the segment's logits).

    * ``sides``: nodes outside the layer's downstream that the path from the layer to the target
      reads (a residual shortcut, say);
    * ``prefix(*model_inputs) -> (layer input, *sides)``;
    * ``suffix(layer output, *sides) -> (logits,)`` (None when ``with_suffix`` is False);
    * ``clone_output`` / ``clone_sides``: which of those a suffix node writes into (they are
      cloned before each call, so cached values and the layer output stay intact).
    """

    def __init__(self, gm: fx.GraphModule, layer: str, target: str | None, with_suffix: bool = True):
        nodes = {n.name: n for n in gm.graph.nodes}
        node = nodes[layer]
        if not node.args or not isinstance(node.args[0], fx.Node) or len(node.args) != 1 or node.kwargs:
            raise ValueError(f"layer node '{layer}' must be called on one tensor")
        x = node.args[0]
        self.sides: list[fx.Node] = []
        self.suffix: fx.GraphModule | None = None
        self.clone_output = False
        self.clone_sides: list[bool] = []
        if with_suffix and target is not None:
            tgt = nodes[target]
            down = descendants(node) & ancestors(tgt)
            if tgt not in down:
                raise ValueError(f"node '{target}' does not depend on layer '{layer}'")
            seen: set[fx.Node] = set()
            for n in gm.graph.nodes:
                if n in down and n is not node:
                    for a in n.all_input_nodes:
                        if a not in down and a.op != "get_attr" and a not in seen:
                            seen.add(a)
                            self.sides.append(a)
            modules = module_index(gm)
            writers = [n for n in down if n is not node and mutates_first_argument(n, modules) and n.args]
            written = {n.args[0] for n in writers if isinstance(n.args[0], fx.Node)}
            self.clone_output = node in written
            self.clone_sides = [s in written for s in self.sides]
            self.suffix = extract(gm, [node] + self.sides, [tgt])
        outputs = [x] + [s for s in self.sides if s is not x]
        self._x_is_side = [s is x for s in self.sides]
        self.prefix = extract(gm, [], outputs, model_inputs=True)

    def run_prefix(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, list]:
        """(layer input, side values) for a batch of model inputs."""
        out = self.prefix(*inputs)
        x, rest = out[0], list(out[1:])
        sides = [x if is_x else rest.pop(0) for is_x in self._x_is_side]
        return x, sides

    def run_suffix(self, output: torch.Tensor, sides: list) -> torch.Tensor:
        if self.clone_output:
            output = output.clone()
        vals = [s.clone() if c and isinstance(s, torch.Tensor) else s for s, c in zip(sides, self.clone_sides)]
        return self.suffix(output, *vals)[0]
