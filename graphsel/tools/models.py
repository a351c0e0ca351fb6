"""Reference CNN architectures as plain ``nn.Module`` s (random initialisation, no downloads).

These are the generic CIFAR / Fashion-MNIST architectures the method papers evaluate on, written
so that graphsel's passes see the structures they pattern-match: pre-activation nets are built
from ``BatchNorm2d → ReLU → Conv2d`` chains (module spelling, inplace ReLU, bias-free convs),
post-activation nets from ``Conv2d → BatchNorm2d → ReLU``. Every constructor takes
``in_channels`` (3 for CIFAR, 1 for Fashion-MNIST) and ``num_classes``; the classifier ends in
``AdaptiveAvgPool2d(1)`` so any input size works (32×32 CIFAR, 28×28 Fashion-MNIST).

Sizes at 3×32×32 with 10 classes, counted by :func:`graphsel.analysis.cost.cost` (MACs = conv + linear
multiply-accumulates at batch 1, the convention of the papers and of torchvision), checked
against the papers' figures in ``tests/test_models.py``:

===============================================  ===========  ===========  =====================
model                                            params       MACs         paper
===============================================  ===========  ===========  =====================
``densenet_cifar(40)``  (bottleneck, k = 12)      0.212 M      71.3 M       SConv: 0.212 M / 71.3 M
``densenet_cifar(100)`` (bottleneck, k = 12)      0.996 M      286 M        SConv: 0.996 M / 286 M
``preact_resnet_cifar(164)``                      1.661 M      239 M        SConv: 1.661 M / 239 M
``resnext29_cifar(8, 64)``                        33.75 M      4.90 G       SConv: 33.75 M / 4.90 G
``preact_resnet_cifar(56)``                       8.556e5      1.257e8      DCP: 8.556e5 / 1.257e8
``resnet_cifar(110)``                             1.73 M       2.53e8       BSN: 1.73 M / 2.54e8 (*)
===============================================  ===========  ===========  =====================

(*) BSN's 2.54e8 also counts one multiply-add per BatchNorm output element (conv + linear +
BN = 2.539e8); see ``tests/test_models.py``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BNReLUConv", "densenet_cifar", "preact_resnet_cifar", "resnet_cifar", "resnext29_cifar", "tiny_convnet",
]


# ------------------------------------------------------------------------------------------------
# shared pieces

class BNReLUConv(nn.Sequential):
    """``BatchNorm2d → ReLU(inplace) → Conv2d(bias=False)``, the pre-activation unit."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int = 0, groups: int = 1):
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(in_channels)),
            ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                               groups=groups, bias=False)),
        ]))


class _Head(nn.Module):
    """``[BN → ReLU] → global average pool → flatten → Linear``."""

    def __init__(self, channels: int, num_classes: int, pre_activation: bool):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels) if pre_activation else None
        self.relu = nn.ReLU(inplace=True) if pre_activation else None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        if self.norm is not None:
            x = self.relu(self.norm(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _pad_channels(x: torch.Tensor, extra: int, before: int = 0) -> torch.Tensor:
    """Zero-pad the channel dimension of an N×C×H×W tensor (``before`` zeros first, then the rest)."""
    return F.pad(x, (0, 0, 0, 0, before, extra - before))


def _init_weights(model: nn.Module) -> nn.Module:
    """He-normal (fan-out) convs, BN γ = 1 / β = 0, zero Linear bias: the papers' initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return model


def _check_common(in_channels: int, num_classes: int) -> None:
    for name, v in (("in_channels", in_channels), ("num_classes", num_classes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _stem(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)


# ------------------------------------------------------------------------------------------------
# DenseNet

class DenseUnit(nn.Module):
    """One dense unit: ``[BN-ReLU-Conv1×1(4k)] → BN-ReLU-Conv3×3(k)``, output concatenated to the input."""

    def __init__(self, in_channels: int, growth_rate: int, bottleneck: bool, dropout: float = 0.0):
        super().__init__()
        if bottleneck:
            self.brc1 = BNReLUConv(in_channels, 4 * growth_rate, 1)
            self.brc2 = BNReLUConv(4 * growth_rate, growth_rate, 3, padding=1)
        else:
            self.brc1 = None
            self.brc2 = BNReLUConv(in_channels, growth_rate, 3, padding=1)
        self.drop = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x):
        h = x if self.brc1 is None else self.brc1(x)
        h = self.brc2(h)
        if self.drop is not None:
            h = self.drop(h)
        return torch.cat([x, h], 1)


class Transition(nn.Module):
    """Between dense blocks: ``[BN-ReLU-Conv1×1(compressed)] → AvgPool 2×2``; the conv exists only
    when ``out_channels != in_channels`` (compression < 1)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.brc = BNReLUConv(in_channels, out_channels, 1) if out_channels != in_channels else None
        self.pool = nn.AvgPool2d(2, stride=2)

    def forward(self, x):
        if self.brc is not None:
            x = self.brc(x)
        return self.pool(x)


class DenseNetCIFAR(nn.Module):
    """DenseNet for small images (Huang et al. 2017; the selective-convolution paper's variant)."""

    def __init__(self, units_per_block: tuple[int, ...], growth_rate: int, bottleneck: bool,
                 compression: float, stem_channels: int, in_channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.stem = _stem(in_channels, stem_channels)
        blocks: list[nn.Module] = []
        c = stem_channels
        for b, n in enumerate(units_per_block):
            units = []
            for _ in range(n):
                units.append(DenseUnit(c, growth_rate, bottleneck, dropout))
                c += growth_rate
            blocks.append(nn.Sequential(*units))
            if b != len(units_per_block) - 1:
                out = int(c * compression)
                blocks.append(Transition(c, out))
                c = out
        self.features = nn.Sequential(*blocks)
        self.head = _Head(c, num_classes, pre_activation=True)
        self.num_features = c
        _init_weights(self)

    def forward(self, x):
        return self.head(self.features(self.stem(x)))


def densenet_cifar(depth: int = 40, growth_rate: int = 12, bottleneck: bool = True, *, compression: float = 1.0,
                   stem_channels: int | None = None, in_channels: int = 3, num_classes: int = 10,
                   dropout: float = 0.0) -> DenseNetCIFAR:
    """DenseNet with 3 dense blocks for 32×32 / 28×28 inputs.

    The defaults are the selective-convolution paper's DenseNet-40 (its B.3 and the authors' code):
    bottleneck units ``BN-ReLU-Conv1×1(4k) → BN-ReLU-Conv3×3(k)``, growth rate k = 12,
    ``(depth − 4) / 6`` = 6 units per block, a 3×3 stem conv with 2k channels, and **no
    transition convs**: between blocks only a 2×2 average pool (``compression=1.0``); the head is
    BN-ReLU-global-pool-Linear. This gives exactly 0.212 M parameters and 71.3 M MACs on 3×32×32
    (DenseNet-100: 16 units per block, 0.996 M / 286 M). ``compression < 1`` adds DenseNet-BC's
    BN-ReLU-Conv1×1 transition (e.g. DenseNet-BC-100: ``compression=0.5``).
    ``bottleneck=False`` uses single 3×3 units and ``(depth − 4) / 3`` units per block
    (Huang et al.'s DenseNet-40 with k = 12 has about 1.0 M parameters).
    """
    _check_common(in_channels, num_classes)
    per = 6 if bottleneck else 3
    if not isinstance(depth, int) or depth < 4 + per or (depth - 4) % per:
        raise ValueError(f"densenet_cifar: depth must be 4 + {per}·n (n ≥ 1) for bottleneck={bottleneck}, "
                         f"e.g. {'40, 100, 190' if bottleneck else '40, 100'}; got {depth!r}")
    if growth_rate < 1:
        raise ValueError(f"densenet_cifar: growth_rate must be ≥ 1, got {growth_rate!r}")
    if not 0 < compression <= 1:
        raise ValueError(f"densenet_cifar: compression must be in (0, 1], got {compression!r}")
    n = (depth - 4) // per
    return DenseNetCIFAR((n, n, n), growth_rate, bottleneck, compression,
                         stem_channels if stem_channels is not None else 2 * growth_rate,
                         in_channels, num_classes, dropout)


# ------------------------------------------------------------------------------------------------
# Pre-activation ResNet

class PreActBottleneck(nn.Module):
    """``BRC 1×1(p) → BRC 3×3(p) → BRC 1×1(4p)`` plus the identity; a wider output zero-pads the
    shortcut's channels (the selective-convolution paper's ResNet-164 block)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int):
        super().__init__()
        self.brc1 = BNReLUConv(in_channels, planes, 1)
        self.brc2 = BNReLUConv(planes, planes, 3, padding=1)
        self.brc3 = BNReLUConv(planes, planes * self.expansion, 1)
        self.extra = planes * self.expansion - in_channels

    def forward(self, x):
        h = self.brc3(self.brc2(self.brc1(x)))
        if self.extra > 0:
            x = _pad_channels(x, self.extra)
        return x + h


class PreActBasic(nn.Module):
    """``BN-ReLU-Conv3×3(stride) → BN-ReLU-Conv3×3`` plus a shortcut (DCP's pre-activation block).

    ``shortcut_from_activation`` (the first block of a stage, DCP's "half pre-activation") takes the
    shortcut after the first BN-ReLU, through a strided 1×1 conv when the shape changes; otherwise
    the shortcut is the raw input.
    """

    def __init__(self, in_channels: int, planes: int, stride: int = 1, shortcut_from_activation: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut_from_activation = shortcut_from_activation
        self.downsample = (nn.Conv2d(in_channels, planes, 1, stride=stride, bias=False)
                           if stride != 1 or in_channels != planes else None)

    def forward(self, x):
        a = self.relu1(self.bn1(x))
        residual = a if self.shortcut_from_activation else x
        h = self.conv2(self.relu2(self.bn2(self.conv1(a))))
        if self.downsample is not None:
            residual = self.downsample(residual)
        return h + residual


class PreActResNetCIFAR(nn.Module):
    """Pre-activation ResNet for small images (He et al. 2016b)."""

    def __init__(self, stages: nn.Sequential, stem_channels: int, out_channels: int, in_channels: int,
                 num_classes: int):
        super().__init__()
        self.stem = _stem(in_channels, stem_channels)
        self.features = stages
        self.head = _Head(out_channels, num_classes, pre_activation=True)
        self.num_features = out_channels
        _init_weights(self)

    def forward(self, x):
        return self.head(self.features(self.stem(x)))


def preact_resnet_cifar(depth: int = 164, bottleneck: bool | None = None, *, in_channels: int = 3,
                        num_classes: int = 10) -> PreActResNetCIFAR:
    """Pre-activation ResNet with 3 stages (16, 32, 64 base widths) for 32×32 / 28×28 inputs.

    * ``bottleneck=True`` (default for depth 164 = 9n + 2): the selective-convolution paper's
      ResNet-164: n = 18 bottleneck blocks per stage (BRC 1×1 → BRC 3×3 → BRC 1×1, expansion 4),
      identity shortcuts whose missing channels are zero-padded, and a 2×2 average pool between
      stages instead of strided convs (its B.3). 1.661 M parameters, 239 M MACs at 3×32×32.
    * ``bottleneck=False`` (default for other depths, 6n + 2): DCP's pre-activation ResNet
      (e.g. ResNet-56, n = 9): basic blocks; the first block of stages 2 and 3 uses stride 2 and a
      strided 1×1 conv shortcut taken after its first BN-ReLU. 8.556e5 parameters and 1.257e8 MACs.
    """
    _check_common(in_channels, num_classes)
    if bottleneck is None:
        bottleneck = isinstance(depth, int) and depth >= 164 and (depth - 2) % 9 == 0
    per = 9 if bottleneck else 6
    if not isinstance(depth, int) or depth < 2 + per or (depth - 2) % per:
        raise ValueError(f"preact_resnet_cifar: depth must be {per}·n + 2 for bottleneck={bottleneck} "
                         f"(e.g. {'164, 1001' if bottleneck else '20, 56, 110'}); got {depth!r}")
    n = (depth - 2) // per
    stages = []
    if bottleneck:
        c, planes = 16, 16
        for s in range(3):
            blocks = []
            for _ in range(n):
                blocks.append(PreActBottleneck(c, planes))
                c = planes * PreActBottleneck.expansion
            stages.append(nn.Sequential(*blocks))
            if s != 2:
                stages.append(nn.AvgPool2d(2, stride=2))
                planes *= 2
        return PreActResNetCIFAR(nn.Sequential(*stages), 16, c, in_channels, num_classes)
    c = 16
    for s, planes in enumerate((16, 32, 64)):
        stride = 1 if s == 0 else 2
        blocks = [PreActBasic(c, planes, stride, shortcut_from_activation=True)]
        blocks += [PreActBasic(planes, planes) for _ in range(n - 1)]
        stages.append(nn.Sequential(*blocks))
        c = planes
    return PreActResNetCIFAR(nn.Sequential(*stages), 16, c, in_channels, num_classes)


# ------------------------------------------------------------------------------------------------
# Post-activation ResNet

class BasicBlock(nn.Module):
    """``Conv3×3(stride)-BN-ReLU-Conv3×3-BN`` + shortcut, then ReLU (He et al. 2016a).

    ``shortcut="A"``: parameter-free; subsample by the stride and zero-pad the new channels
    (half before, half after, the usual CIFAR ResNet). ``"B"``: strided 1×1 conv + BN when the shape
    changes, identity otherwise.
    """

    def __init__(self, in_channels: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.stride = stride
        self.extra = planes - in_channels
        self.downsample = None
        if shortcut == "B" and (stride != 1 or self.extra):
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        h = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if self.downsample is not None:
            x = self.downsample(x)
        else:
            if self.stride != 1:
                x = x[:, :, ::self.stride, ::self.stride]
            if self.extra > 0:
                x = _pad_channels(x, self.extra, before=self.extra // 2)
        return self.relu2(x + h)


class ResNetCIFAR(nn.Module):
    """Post-activation ResNet for small images."""

    def __init__(self, n: int, shortcut: str, in_channels: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(OrderedDict([
            ("conv", _stem(in_channels, 16)), ("bn", nn.BatchNorm2d(16)), ("relu", nn.ReLU(inplace=True))]))
        stages, c = [], 16
        for s, planes in enumerate((16, 32, 64)):
            stride = 1 if s == 0 else 2
            blocks = [BasicBlock(c, planes, stride, shortcut)]
            blocks += [BasicBlock(planes, planes, 1, shortcut) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            c = planes
        self.features = nn.Sequential(*stages)
        self.head = _Head(c, num_classes, pre_activation=False)
        self.num_features = c
        _init_weights(self)

    def forward(self, x):
        return self.head(self.features(self.stem(x)))


def resnet_cifar(depth: int = 56, *, shortcut: str = "A", in_channels: int = 3, num_classes: int = 10) -> ResNetCIFAR:
    """The CIFAR ResNet of He et al. (2016a): 3 stages of n = (depth − 2) / 6 post-activation basic
    blocks with 16, 32, 64 channels; parameter-free shortcuts (``"A"``) by default, as the paper
    and the budgeted-super-network experiments use. ResNet-110: 1.73 M parameters, 2.53e8 MACs."""
    _check_common(in_channels, num_classes)
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"resnet_cifar: depth must be 6·n + 2 (20, 32, 44, 56, 110, ...), got {depth!r}")
    if shortcut not in ("A", "B"):
        raise ValueError(f"resnet_cifar: shortcut must be 'A' (zero-pad) or 'B' (1×1 conv), got {shortcut!r}")
    return ResNetCIFAR((depth - 2) // 6, shortcut, in_channels, num_classes)


# ------------------------------------------------------------------------------------------------
# ResNeXt

class PreActResNeXtBlock(nn.Module):
    """``BRC 1×1(D) → BRC 3×3 grouped(D, cardinality) → BRC 1×1(out)`` plus the identity, the
    shortcut's missing channels zero-padded (the selective-convolution paper's ResNeXt block)."""

    def __init__(self, in_channels: int, out_channels: int, inner: int, cardinality: int):
        super().__init__()
        self.brc1 = BNReLUConv(in_channels, inner, 1)
        self.brc2 = BNReLUConv(inner, inner, 3, padding=1, groups=cardinality)
        self.brc3 = BNReLUConv(inner, out_channels, 1)
        self.extra = out_channels - in_channels

    def forward(self, x):
        h = self.brc3(self.brc2(self.brc1(x)))
        if self.extra > 0:
            x = _pad_channels(x, self.extra)
        return x + h


class ResNeXtCIFAR(nn.Module):
    def __init__(self, stages: nn.Sequential, out_channels: int, in_channels: int, num_classes: int):
        super().__init__()
        self.stem = _stem(in_channels, 64)
        self.features = stages
        self.head = _Head(out_channels, num_classes, pre_activation=True)
        self.num_features = out_channels
        _init_weights(self)

    def forward(self, x):
        return self.head(self.features(self.stem(x)))


def resnext29_cifar(cardinality: int = 8, width: int = 64, *, widen_factor: int = 4, blocks_per_stage: int = 3,
                    in_channels: int = 3, num_classes: int = 10) -> ResNeXtCIFAR:
    """ResNeXt-29 (cardinality × width d) for small images, as the selective-convolution paper
    builds it (Xie et al. 2017 with its B.3 simplifications): 3×3 stem to 64 channels, 3 stages of
    3 pre-activation bottleneck blocks with outputs 256, 512, 1024 (``64·widen_factor·2^s``) and
    inner width ``cardinality·width·2^s``, grouped 3×3 convs, identity shortcuts with zero-padded
    channels, 2×2 average pooling between stages. ResNeXt-29 8×64d: 33.75 M parameters, 4.90 G MACs.
    """
    _check_common(in_channels, num_classes)
    for name, v in (("cardinality", cardinality), ("width", width), ("widen_factor", widen_factor),
                    ("blocks_per_stage", blocks_per_stage)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"resnext29_cifar: {name} must be a positive int, got {v!r}")
    stages, c = [], 64
    for s in range(3):
        out = 64 * widen_factor * 2 ** s
        inner = cardinality * width * 2 ** s
        blocks = []
        for _ in range(blocks_per_stage):
            blocks.append(PreActResNeXtBlock(c, out, inner, cardinality))
            c = out
        stages.append(nn.Sequential(*blocks))
        if s != 2:
            stages.append(nn.AvgPool2d(2, stride=2))
    return ResNeXtCIFAR(nn.Sequential(*stages), c, in_channels, num_classes)


# ------------------------------------------------------------------------------------------------
# tiny

class TinyConvNet(nn.Module):
    """A small CNN with the structures passes look for: a strided post-activation stem, a
    pre-activation residual block (BN-ReLU-Conv chains), a strided conv and a dense concat."""

    def __init__(self, in_channels: int, num_classes: int, width: int):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU(inplace=True))
        self.block = nn.Sequential(BNReLUConv(w, w, 3, padding=1), BNReLUConv(w, w, 3, padding=1))
        self.down = BNReLUConv(w, 2 * w, 3, stride=2, padding=1)
        self.dense = BNReLUConv(2 * w, w, 1)
        self.head = _Head(3 * w, num_classes, pre_activation=True)
        _init_weights(self)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        x = self.down(x)
        x = torch.cat([x, self.dense(x)], 1)
        return self.head(x)


def tiny_convnet(in_channels: int = 3, num_classes: int = 10, *, width: int = 8) -> TinyConvNet:
    """A few-layer CNN for demos and fast tests: about 0.30 M MACs at 1×28×28 and 0.43 M at 3×32×32
    with the default ``width=8`` (about 3 k parameters)."""
    _check_common(in_channels, num_classes)
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"tiny_convnet: width must be a positive int, got {width!r}")
    return TinyConvNet(in_channels, num_classes, width)
