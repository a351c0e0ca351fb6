"""Residual blocks, stages, pivots and candidate layers of a traced graph — found on the graph, not
by module names.

* A **residual block** is an add of two tensors of the same shape whose channels the channel
  analysis unions (so both carry the same channel classes) and whose operands descend from a
  common node along different paths, at least one of them through a weight layer (conv or
  linear). Its *branch* is every node on those paths below the common node (the body and a
  projection shortcut); its *output* is the add, or the activation that is the add's only user
  (a post-activation block's final ReLU).
* **Stages** are runs of consecutive blocks whose outputs carry the same channel classes (a
  projection shortcut starts a new one).
* **Pivots** (methods.md §3): with B blocks and P auxiliary classifiers, blocks per segment =
  B // (P + 1) + 1 and pivot i (0-based) lies after block number min(per·(i+1), B − 1), counted
  from 1 — the authors' ``cal_pivot``. ``heads="auto"``: one classifier per ten weight layers of
  the longest path (ResNet-18: 2, ResNet-56: 6; the paper used 3 on ResNet-56 and found 5–10
  layers per loss a good trade-off), at most B − 1.
* **Candidate layers** (``scope="block_internal"``): convolutions (groups = 1) and linear layers
  on a block's branch whose input channels belong to no residual stream — the layers DCP prunes
  (a basic block's second conv, a bottleneck's second and third, an inverted residual's
  projection). ``scope="all"``: every such layer of the graph, stream readers included. Layers
  whose input channels are frozen (a barrier, a model input) are skipped with the reason.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphsel.analysis.channels import ChannelAnalysis
from graphsel.analysis.masks import removal_positions
from graphsel.ir.graph import call_count, module_index
from graphsel.ir.shapes import tensor_shape
from graphsel.ops.channel import TensorVal
from graphsel.pipeline.passbase import Diagnostic
from graphsel.pipeline.select import ModuleSelection

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish)
_ACT_FUNCTIONS = (torch.relu, torch.relu_, F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.leaky_relu, F.elu)
_ACT_METHODS = ("relu", "relu_")
_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
SCOPES = ("block_internal", "all")
_PLAIN_FORWARDS = tuple(c.forward for c in _WEIGHT_LAYERS)


@dataclass(frozen=True)
class ResidualBlock:
    """One residual add and what lies on its branches (node names)."""
    index: int
    add: str
    output: str
    entry: str
    layers: tuple[str, ...]
    channels: int
    stage: int


@dataclass(frozen=True)
class Layer:
    """A layer whose input channels DCP selects: its node and module, the number of input channels,
    the block it lies in (None outside blocks, ``scope="all"``), and the modules producing its inputs."""
    node: str
    module: str
    kind: str            # "conv" or "linear"
    channels: int
    block: int | None
    producers: tuple[str, ...]


@dataclass
class Structure:
    """The residual structure of a graph: blocks in graph order, stage count, weight-layer depth."""
    blocks: list[ResidualBlock] = field(default_factory=list)
    stages: int = 0
    depth: int = 0
    #: adds that look residual (same shapes, a common input, a weight layer on a branch) but whose
    #: channels the channel analysis cannot follow (an opaque attention module upstream, say)
    opaque_adds: list[str] = field(default_factory=list)

    def no_blocks_reason(self) -> str:
        """Why the graph has no residual blocks, for error messages."""
        if self.opaque_adds:
            return (f"it has {len(self.opaque_adds)} residual add(s) (e.g. node '{self.opaque_adds[0]}'), but the "
                    f"channel analysis cannot follow channels through them (an opaque module, such as attention, "
                    f"upstream)")
        return "it has no residual blocks (no add of a branch with a conv or linear layer to its input)"

    def heads_for(self, heads: int | str) -> int:
        """The number of auxiliary classifiers ``heads`` (an int, or ``"auto"``) gives: at most one
        per block before the last (pivots that coincide count once)."""
        return len(self.pivots(heads))

    def pivots(self, heads: int | str) -> list[int]:
        """Indices (0-based) of the blocks after which the auxiliary classifiers go."""
        asked = max(1, int(self.depth / 10 + 0.5)) if heads == "auto" else int(heads)
        return pivot_blocks(len(self.blocks), min(asked, max(0, len(self.blocks) - 1)))


def check_heads(heads, owner: str) -> None:
    from .errors import DCPError
    if heads == "auto":
        return
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 0:
        raise DCPError(f"{owner}: heads must be a number of auxiliary classifiers (an int ≥ 0) or 'auto' (one per "
                       f"ten layers), got {heads!r}")


def pivot_blocks(n_blocks: int, heads: int) -> list[int]:
    """The authors' ``cal_pivot``: pivot i after block number min(per·(i+1), B − 1) counted from 1,
    per = B // (P + 1) + 1; returned 0-based, without repeats."""
    if heads <= 0 or n_blocks < 2:
        return []
    per = n_blocks // (heads + 1) + 1
    out: list[int] = []
    for i in range(heads):
        b = min(per * (i + 1), n_blocks - 1) - 1
        if b >= 0 and b not in out:
            out.append(b)
    return out


def _is_add(n: fx.Node) -> bool:
    if n.op == "call_function" and n.target in _ADD_FUNCTIONS:
        return "alpha" not in n.kwargs
    return n.op == "call_method" and n.target in _ADD_METHODS and "alpha" not in n.kwargs


def _is_activation(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if n.op == "call_module":
        return isinstance(modules.get(n.target), _ACT_MODULES)
    if n.op == "call_function":
        return n.target in _ACT_FUNCTIONS
    return n.op == "call_method" and n.target in _ACT_METHODS


def is_weight_layer(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return n.op == "call_module" and isinstance(modules.get(n.target), _WEIGHT_LAYERS)


def _closure(node: fx.Node, step) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it depends on."""
    return _closure(node, lambda n: n.all_input_nodes)


def descendants(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node that depends on it."""
    return _closure(node, lambda n: n.users)


def weight_depth(gm: fx.GraphModule, modules: dict[str, nn.Module] | None = None) -> int:
    """Weight layers (conv, linear) on the longest path of the graph (ResNet-56: 56)."""
    modules = module_index(gm) if modules is None else modules
    depth: dict[fx.Node, int] = {}
    best = 0
    for n in gm.graph.nodes:
        d = max((depth[a] for a in n.all_input_nodes), default=0) + int(is_weight_layer(n, modules))
        depth[n] = d
        best = max(best, d)
    return best


def find_structure(gm: fx.GraphModule, a: ChannelAnalysis) -> Structure:
    """The residual blocks of ``gm`` (see the module docstring), in graph order."""
    modules = module_index(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    blocks: list[ResidualBlock] = []
    opaque: list[str] = []
    stage, last_classes = -1, None
    for n in gm.graph.nodes:
        if not _is_add(n):
            continue
        operands = [x for x in (list(n.args) + list(n.kwargs.values())) if isinstance(x, fx.Node)]
        if len(operands) != 2:
            continue
        sa, sb = tensor_shape(operands[0]), tensor_shape(operands[1])
        if sa is None or sa != sb:
            continue
        anc_a, anc_b = ancestors(operands[0]), ancestors(operands[1])
        common = anc_a & anc_b
        if not common:
            continue
        branch = (anc_a | anc_b) - common
        layers = sorted((m for m in branch if is_weight_layer(m, modules)), key=order.__getitem__)
        if not layers:
            continue
        va, vb = (a.values.get(x.name) for x in operands)
        if not (isinstance(va, TensorVal) and isinstance(vb, TensorVal) and va.has_channels and vb.has_channels
                and len(va.ids) == len(vb.ids) and np.array_equal(a.class_of(va.ids), a.class_of(vb.ids))):
            opaque.append(n.name)
            continue
        out = n
        users = list(n.users)
        if len(users) == 1 and _is_activation(users[0], modules) and users[0].args and users[0].args[0] is n:
            out = users[0]
        classes = tuple(a.class_of(va.ids).tolist())
        if classes != last_classes:
            stage, last_classes = stage + 1, classes
        blocks.append(ResidualBlock(len(blocks), n.name, out.name, max(common, key=order.__getitem__).name,
                                    tuple(m.name for m in layers), len(va.ids), stage))
    return Structure(blocks, stage + 1, weight_depth(gm, modules), opaque)


def _stream_classes(a: ChannelAnalysis, structure: Structure) -> set[int]:
    """Channel classes of the residual streams: every block's output and entry value (a block
    whose shortcut is a projection starts a new stream; its input belongs to the old one)."""
    out: set[int] = set()
    for b in structure.blocks:
        for name in (b.add, b.entry):
            v = a.values.get(name)
            if isinstance(v, TensorVal) and v.has_channels:
                out.update(int(c) for c in a.class_of(v.ids) if c >= 0)
    return out


def candidate_layers(gm: fx.GraphModule, a: ChannelAnalysis, structure: Structure, scope: str,
                     selection: ModuleSelection | None = None, skip_modules: set[str] = frozenset()
                     ) -> tuple[list[Layer], list[Diagnostic]]:
    """The layers DCP selects input channels of, in graph order, and why others were skipped."""
    modules = module_index(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    readers = {r.node: r for r in a.readers if r.kind in ("conv_in", "linear_in") and r.module is not None}
    block_of: dict[str, int] = {}
    for b in structure.blocks:
        for name in b.layers:
            block_of.setdefault(name, b.index)
    stream = _stream_classes(a, structure)
    if scope == "block_internal":
        names = [name for name in nodes if name in block_of]
    else:
        names = [n.name for n in gm.graph.nodes if is_weight_layer(n, modules)]
    layers: list[Layer] = []
    diags: list[Diagnostic] = []
    for name in names:
        node = nodes[name]
        path = node.target
        m = modules[path]
        if path in skip_modules:
            continue
        if selection is not None and selection.active:
            why = selection.why_not(path, m)
            if why is not None:
                diags.append(Diagnostic(why, path, "info"))
                continue
        r = readers.get(name)
        if r is None:
            continue
        cls = a.class_of(r.ids)
        if scope == "block_internal" and any(int(c) in stream for c in cls):
            continue                                   # reads the residual stream: never pruned here
        kind = "linear" if isinstance(m, nn.Linear) else "conv"
        if kind == "conv" and m.groups != 1:
            diags.append(Diagnostic(f"skipped: groups={m.groups} (DCP selects input channels of groups=1 convs)", path))
            continue
        if type(m).forward not in _PLAIN_FORWARDS:
            diags.append(Diagnostic(f"skipped: {type(m).__name__} has its own forward", path))
            continue
        if call_count(gm, path) != 1:
            diags.append(Diagnostic(f"skipped: called at {call_count(gm, path)} places", path))
            continue
        frozen = [int(c) for c in cls if int(c) in a.class_frozen]
        if frozen or (cls < 0).any():
            reason = a.class_frozen[frozen[0]][0] if frozen else "input positions without channel classes"
            diags.append(Diagnostic(f"skipped: its input channels are frozen ({reason})", path))
            continue
        if len(cls) < 2:
            continue
        producers = tuple(sorted(removal_positions(a, set(int(c) for c in cls))))
        layers.append(Layer(name, path, kind, len(cls), block_of.get(name), producers))
    return layers, diags
