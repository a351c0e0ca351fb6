"""Super networks of paper 004's appendix as plain, traceable ``nn.Module`` s.

Neither holds a gate: ``graphsel.transform(fabric, [("budget_gates", {"on": ...})], x)`` puts them
on the edges (``on="residual"`` for :class:`ResNetFabric`, ``on="blocks"`` for
:class:`ConvNeuralFabric`), so the same pass works on these and on any other model.

**ResNet fabric** (appendix, "ResNet Fabric"; paper fig. 1a). ``k`` groups of ``n`` residual
nodes; widths double and resolutions halve from group to group. Node ``j`` of a group sums a
stream (node ``j − 1``, or for ``j = 0`` the previous group's last node subsampled and
zero-padded: the parameter-free shortcut of the CIFAR ResNet), the residual function of the
chain (conv3×3 – BN – ReLU – conv3×3 – BN of node ``j − 1``, strided for ``j = 0``), and — from
the second group on — the residual functions of the **cross connections** from nodes ``j − 1``,
``j``, ``j + 1`` of the previous group (two inputs for the first and last node of a group, three
for the others, as the appendix says; each a strided basic-block function), then a ReLU. With every
cross connection off the fabric is the CIFAR ResNet-(6n + 2) (``n = 3, 5, 7, 9, 18``: ResNet-20
to 110); with every edge on it is the super network. Every edge is a residual branch, so
``on="residual"`` gates them all and no gate setting disconnects the network.

**Convolutional neural fabric** (appendix, "Convolutional Neural Fabric"; CNF of Saxena and
Verbeek). ``W`` columns × ``H`` scales, each scale half the previous resolution. Column 0 is the
stem (a conv, then strided convs down the scales); node ``(l, s)`` of every later column sums
three edges from column ``l − 1``: from the finer scale (stride-2 conv), the same scale (conv)
and the coarser scale (nearest upsampling, then conv), each conv followed by BatchNorm, then
ReLU. The last column also receives its own finer scale (the vertical connections of the first
and last columns). The classifier reads the coarsest node of the last column. Every edge is an
``nn.Sequential`` in ``edges`` whose output is summed: ``on="blocks"`` gates them.

Sizes (``ResNetFabric.options`` / ``ConvNeuralFabric.options``): a few named configurations.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _check(name: str, v, lo: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int ≥ {lo}, got {v!r}")


def _init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return model


def residual_function(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """conv3×3(stride) – BN – ReLU – conv3×3 – BN: the residual function of a basic block."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))


def _subsample_pad(x: torch.Tensor, extra: int) -> torch.Tensor:
    """The CIFAR ResNet's parameter-free shortcut: stride-2 subsampling, zero-padded channels."""
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, extra // 2, extra - extra // 2))


class FabricGroup(nn.Module):
    """One group of a :class:`ResNetFabric`: ``chain[j]`` and ``cross["i_j"]`` (from node ``i`` of the
    previous group into node ``j``)."""

    def __init__(self, cin: int, cout: int, blocks: int, first: bool, cross: bool):
        super().__init__()
        self.first, self.cin, self.cout, self.blocks = first, cin, cout, blocks
        stride = 1 if first else 2
        self.chain = nn.ModuleList(residual_function(cin if j == 0 else cout, cout, stride if j == 0 else 1)
                                   for j in range(blocks))
        self.cross = nn.ModuleDict()
        self.sources: list[list[int]] = [[] for _ in range(blocks)]
        if cross and not first:
            for j in range(blocks):
                for i in (j - 1, j, j + 1):
                    if 0 <= i < blocks and not (j == 0 and i == blocks - 1):   # that one is the chain's
                        self.cross[f"{i}_{j}"] = residual_function(cin, cout, 2)
                        self.sources[j].append(i)
        self.relu = nn.ReLU()

    def forward(self, previous: list[torch.Tensor]) -> list[torch.Tensor]:
        outs: list[torch.Tensor] = []
        x = previous[-1]
        for j in range(self.blocks):
            if j == 0:
                stream = x if self.first else _subsample_pad(x, self.cout - self.cin)
                y = stream + self.chain[0](x)
            else:
                y = outs[-1] + self.chain[j](outs[-1])
            for i in self.sources[j]:
                y = y + self.cross[f"{i}_{j}"](previous[i])
            outs.append(self.relu(y))
        return outs


class ResNetFabric(nn.Module):
    """The ResNet fabric of paper 004's appendix (see the module docstring).

    ``blocks``: nodes per group (n; ResNet-(6n + 2) is the backbone); ``widths``: channels per
    group (k = len(widths) groups); ``cross=False`` builds the plain backbone.
    """

    options = {"tiny": dict(blocks=2, widths=(8, 16, 32)), "small": dict(blocks=3, widths=(8, 16, 32)),
               "resnet20": dict(blocks=3, widths=(16, 32, 64)), "resnet56": dict(blocks=9, widths=(16, 32, 64)),
               "resnet110": dict(blocks=18, widths=(16, 32, 64))}

    def __init__(self, blocks: int = 3, widths: tuple[int, ...] = (16, 32, 64), *, in_channels: int = 3,
                 num_classes: int = 10, cross: bool = True):
        super().__init__()
        _check("blocks", blocks)
        _check("in_channels", in_channels)
        _check("num_classes", num_classes)
        widths = tuple(widths)
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be positive ints, got {widths!r}")
        if any(b < a for a, b in zip(widths, widths[1:])):
            raise ValueError(f"widths must not decrease (the shortcut zero-pads channels), got {widths!r}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        self.groups = nn.ModuleList(FabricGroup(widths[max(s - 1, 0)], w, blocks, s == 0, cross)
                                    for s, w in enumerate(widths))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        _init(self)

    @classmethod
    def named(cls, name: str, **kw) -> "ResNetFabric":
        if name not in cls.options:
            raise ValueError(f"unknown ResNet fabric {name!r}; options: {', '.join(cls.options)}")
        return cls(**{**cls.options[name], **kw})

    def forward(self, x):
        nodes = [self.stem(x)]
        for g in self.groups:
            nodes = g(nodes)
        return self.fc(torch.flatten(self.pool(nodes[-1]), 1))


class ConvNeuralFabric(nn.Module):
    """A convolutional neural fabric for classification (see the module docstring).

    ``columns`` (W), ``scales`` (H: resolutions ``input_size``, ``⌈input_size/2⌉``, ...; the
    classifier pools the coarsest), ``channels`` per node, ``input_size`` (the side of the square
    input, fixing the resolution of every scale)."""

    options = {"tiny": dict(columns=3, scales=3, channels=8), "small": dict(columns=4, scales=4, channels=16),
               "cifar": dict(columns=8, scales=6, channels=128)}

    def __init__(self, columns: int = 4, scales: int = 4, channels: int = 16, *, in_channels: int = 3,
                 num_classes: int = 10, input_size: int = 32):
        super().__init__()
        _check("columns", columns, 2)
        _check("scales", scales, 2)
        _check("channels", channels)
        _check("in_channels", in_channels)
        _check("num_classes", num_classes)
        _check("input_size", input_size, 2 ** (scales - 1))
        self.columns, self.scales, self.channels = columns, scales, channels
        self.sizes = [input_size]
        for _ in range(scales - 1):
            self.sizes.append(math.floor((self.sizes[-1] + 2 - 3) / 2) + 1)    # a 3×3, stride-2, pad-1 conv
        c = channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU(inplace=True))
        self.down0 = nn.ModuleList(self._conv(2) for _ in range(scales - 1))
        self.edges = nn.ModuleDict()
        self.inputs: dict[tuple[int, int], list[str]] = {}
        for l in range(1, columns):
            for s in range(scales):
                names = []
                for src, kind in ((s - 1, "down"), (s, "same"), (s + 1, "up")):
                    if 0 <= src < scales:
                        name = f"c{l}_s{s}_{kind}"
                        self.edges[name] = self._conv(2 if kind == "down" else 1,
                                                      self.sizes[s] if kind == "up" else None)
                        names.append(name)
                if l == columns - 1 and s > 0:
                    name = f"c{l}_s{s}_vertical"
                    self.edges[name] = self._conv(2)
                    names.append(name)
                self.inputs[(l, s)] = names
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        _init(self)

    def _conv(self, stride: int, upsample_to: int | None = None) -> nn.Sequential:
        c = self.channels
        layers: list[nn.Module] = [nn.Upsample(size=(upsample_to, upsample_to), mode="nearest")] if upsample_to else []
        layers += [nn.Conv2d(c, c, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c)]
        return nn.Sequential(*layers)

    @classmethod
    def named(cls, name: str, **kw) -> "ConvNeuralFabric":
        if name not in cls.options:
            raise ValueError(f"unknown convolutional neural fabric {name!r}; options: {', '.join(cls.options)}")
        return cls(**{**cls.options[name], **kw})

    def forward(self, x):
        col = [self.stem(x)]
        for conv in self.down0:
            col.append(self.relu(conv(col[-1])))
        for l in range(1, self.columns):
            new: list[torch.Tensor] = []
            for s in range(self.scales):
                y = None
                for name in self.inputs[(l, s)]:
                    kind = name.rsplit("_", 1)[1]
                    src = col[s - 1] if kind == "down" else col[s] if kind == "same" else \
                        col[s + 1] if kind == "up" else new[s - 1]
                    e = self.edges[name](src)
                    y = e if y is None else y + e
                new.append(self.relu(y))
            col = new
        return self.fc(torch.flatten(self.pool(col[-1]), 1))
