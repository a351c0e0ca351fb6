"""An independent reference for channel masks on the architectures ``tests/strategies.py`` builds.

graphsel's mask oracle and ``materialize`` both read the project's channel analysis, so a
mistake there can make them agree with each other and both be wrong. This reference reads
neither: it knows how each generated block is built and, in a copy of the model, zeroes the
parameters that make a removed channel zero everywhere it travels —

* the producing filters (weight rows and bias) of every named source;
* the affine parameters of every norm on the channel (γ = β = 0 makes a BatchNorm output 0
  whatever its statistics; ReLU, pooling, dropout, concatenation and addition keep a zero
  channel zero, and an SE gate multiplies a zero channel);
* the weight columns of every consumer that reads it (grouped convolutions: the column in the
  reading group);
* and, for consumer masks, the consumer's columns only.

Constructs whose mask semantics zeroing cannot express — reductions over channels, which the
oracle computes on the kept channels only (the LayerNorm of ConvNeXt blocks, CBAM's mean/max
over channels) — raise :class:`Unsupported`.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

import strategies as S

#: block kinds whose every construct the reference can express
KINDS = tuple(k for k in S.BLOCK_KINDS if k != "convnext")


class Unsupported(Exception):
    """The model holds a construct whose mask semantics zeroing cannot express."""


def _zero_rows(m: nn.Module, rows) -> None:
    rows = sorted(rows)
    if rows:
        m.weight[rows] = 0
        if getattr(m, "bias", None) is not None:
            m.bias[rows] = 0


def _zero_columns(m: nn.Module, cols) -> None:
    """The columns of input channels ``cols`` in a conv (any groups) or a linear layer."""
    if isinstance(m, nn.Linear) or getattr(m, "groups", 1) == 1:
        for c in sorted(cols):
            m.weight[:, c] = 0
        return
    per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
    for c in sorted(cols):
        g = c // per_in
        m.weight[g * per_out:(g + 1) * per_out, c % per_in] = 0


def _shuffled(removed: frozenset[int], width: int, groups: int) -> frozenset[int]:
    """Positions after ``view(n, g, c/g, ...).transpose(1, 2)``: channel i·(c/g) + j lands at j·g + i."""
    per = width // groups
    return frozenset((p % per) * groups + p // per for p in removed)


class _Zeroer:
    def __init__(self, model: nn.Module, removed: dict[str, set[int]]):
        self.model = model
        self.removed = {k: frozenset(v) for k, v in removed.items() if v}
        self.visited: set[str] = set()

    def source(self, path: str, m: nn.Module) -> frozenset[int]:
        self.visited.add(path)
        out = self.removed.get(path, frozenset())
        _zero_rows(m, out)
        return out

    @staticmethod
    def norm(m: nn.Module | None, removed: frozenset[int]) -> None:
        if m is not None:
            _zero_rows(m, removed)

    # -- units -------------------------------------------------------------------------
    def conv_unit(self, path: str, u: S.ConvUnitModule, c: frozenset[int]) -> frozenset[int]:
        conv = u.conv
        if conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels:
            _zero_rows(conv, c)                  # depthwise: a per-channel op
            out = c
        else:
            _zero_columns(conv, c)
            out = self.source(f"{path}.conv", conv)
        self.norm(u.bn, out)
        return out

    def preact_unit(self, path: str, u: S.PreActUnitModule, c: frozenset[int]) -> frozenset[int]:
        self.norm(u.bn, c)
        _zero_columns(u.conv, c)
        return self.source(f"{path}.conv", u.conv)

    def unit(self, path: str, u: nn.Module, c: frozenset[int]) -> frozenset[int]:
        if isinstance(u, S.ConvUnitModule):
            return self.conv_unit(path, u, c)
        if isinstance(u, S.PreActUnitModule):
            return self.preact_unit(path, u, c)
        raise TypeError(type(u).__name__)

    def units(self, path: str, units, c: frozenset[int]) -> frozenset[int]:
        for j, u in enumerate(units):
            c = self.unit(f"{path}.{j}", u, c)
        return c

    # -- blocks ------------------------------------------------------------------------
    def block(self, path: str, b: nn.Module, c: frozenset[int], width: int) -> tuple[frozenset[int], int]:
        """(removed output positions, output width) of a block reading ``width`` channels with
        ``c`` removed."""
        if isinstance(b, S.SequenceModule):
            return self.units(f"{path}.units", b.units, c), b.units[-1].conv.out_channels
        if isinstance(b, S.ResidualModule):
            body = self.units(f"{path}.body", b.body, c)
            short = c if b.shortcut is None else self.unit(f"{path}.shortcut", b.shortcut, c)
            return body | short, b.body[-1].conv.out_channels
        if isinstance(b, S.DenseModule):
            parts = [(c, width)]
            for i, layer in enumerate(b.layers):
                inp, offset = set(), 0
                for r, w in parts:
                    inp |= {offset + p for p in r}
                    offset += w
                parts.append((self.units(f"{path}.layers.{i}", layer, frozenset(inp)), layer[-1].conv.out_channels))
            out, offset = set(), 0
            for r, w in parts:
                out |= {offset + p for p in r}
                offset += w
            return frozenset(out), offset
        if isinstance(b, S.SEModule):
            _zero_columns(b.fc1, c)
            squeezed = self.source(f"{path}.fc1", b.fc1)
            _zero_columns(b.fc2, squeezed)
            return c | self.source(f"{path}.fc2", b.fc2), width
        if isinstance(b, S.SpatialAttentionModule):
            if b.kind == "cbam":
                raise Unsupported("CBAM reduces over channels")
            _zero_columns(b.conv, c)
            self.source(f"{path}.conv", b.conv)
            return c, width
        if isinstance(b, S.ShuffleModule):
            if b.pre is not None:
                c, width = self.unit(f"{path}.pre", b.pre, c), b.pre.conv.out_channels
            c = _shuffled(c, width, b.groups)
            if b.post is not None:
                c, width = self.unit(f"{path}.post", b.post, c), b.post.conv.out_channels
            return c, width
        if isinstance(b, S.SplitModule):
            first = (width + 1) // 2 if b.split != "split" else b.first
            branch = self.units(f"{path}.branch", b.branch, frozenset(p - first for p in c if p >= first))
            out = frozenset({p for p in c if p < first} | {first + q for q in branch})
            return (_shuffled(out, width, 2) if b.shuffle else out), width
        if isinstance(b, S.FanoutModule):
            _zero_columns(b.conv, c)
            out = self.source(f"{path}.conv", b.conv)
            self.norm(b.bn, out)
            return out, b.conv.out_channels
        if isinstance(b, (S.PoolModule, S.DropoutModule)):
            return c, width
        if isinstance(b, S.ConvNeXtModule):
            raise Unsupported("ConvNeXt blocks normalise over channels")
        raise TypeError(type(b).__name__)

    def head(self, path: str, h: S.HeadModule, c: frozenset[int], width: int) -> None:
        layers = list(h.classifier)
        first = layers[0]
        per_channel = first.in_features // width             # 1 after global pooling, H·W for a map
        _zero_columns(first, {p * per_channel + k for p in c for k in range(per_channel)})
        if len(layers) > 1:
            hidden = self.source(f"{path}.classifier.0", first)
            if isinstance(layers[1], nn.BatchNorm1d):
                self.norm(layers[1], hidden)
            _zero_columns(layers[-1], hidden)


def reference_model(model: nn.Module, removed: dict[str, set[int]],
                    consumer: dict[str, set[int]] | None = None) -> nn.Module:
    """A copy of a ``strategies.GeneratedNet`` that computes what the masks mean: group masks
    ``removed`` (source module path -> output positions) and consumer masks ``consumer``
    (module path -> input positions). Raises :class:`Unsupported` for models it cannot express,
    and ``AssertionError`` when a mask names a module the model does not produce channels with."""
    ref = copy.deepcopy(model)
    z = _Zeroer(ref, removed)
    c: frozenset[int] = frozenset()
    width = ref.features[0].units[0].conv.in_channels
    with torch.no_grad():
        for i, b in enumerate(ref.features):
            c, width = z.block(f"features.{i}", b, c, width)
        if ref.head is not None:
            z.head("head", ref.head, c, width)
        for path, positions in (consumer or {}).items():
            _zero_columns(ref.get_submodule(path), positions)
    missing = set(z.removed) - z.visited
    assert not missing, f"group masks name modules that produce no channels here: {sorted(missing)}"
    return ref


def supported(model: nn.Module) -> bool:
    try:
        reference_model(model, {})
    except Unsupported:
        return False
    return True
