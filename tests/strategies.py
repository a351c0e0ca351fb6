"""Hypothesis strategies that build random, valid, small architectures (DESIGN §5).

Every exact pass is a property over these models: ``for all arch: pass(arch.build()) ≡ arch.build()``.

    from hypothesis import given
    from tests.strategies import architectures

    @given(architectures())
    def test_my_pass_is_exact(arch):
        model = arch.build()                      # fresh, deterministic (weights seeded from arch.seed), eval mode
        x = arch.example_inputs()                 # (tensor of arch.input_shape,)
        ...
        assert "dense_concat" in arch.constructs  # the construct names of ALL_CONSTRUCTS present in the model

A drawn :class:`Architecture` is plain data (frozen dataclasses), printed readably when a test
fails and shrunk by Hypothesis towards fewer, narrower, simpler blocks. Models are small
(channels 2–24, at most 32 after a dense block; spatial 6–16; batch 2), so hundreds run in seconds.
BatchNorm running statistics and affine parameters (and LayerNorm's) are random, so no norm
layer is an identity and exactness tests mean something.

Constructs (``ALL_CONSTRUCTS``): conv/BN/ReLU with every ReLU spelling (module, functional,
``torch.relu``, method, and the in-place ``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)``,
``torch.relu_``, ``x.relu_()``); post-activation (Conv→BN→ReLU) and pre-activation
(BN→ReLU→[Dropout]→Conv) units; strided, depthwise and grouped convolutions; residual add
(identity and projection shortcuts; ``+``, ``+=``, ``torch.add``, ``.add``); DenseNet units
(concat of all previous features); SE multiply (N×C×1×1 operand, conv or linear excitation);
spatial attention multiply (N×1×H×W operand); channel shuffle (view/transpose/view);
chunk/split into branches and cat back (ShuffleNet v2); channels-last permute → LayerNorm →
Linear → permute back (ConvNeXt, optional layer scale); a conv output with several users;
dropout; max/avg/adaptive pooling; heads with global pooling or flattening a non-1×1 map,
every flatten spelling, Linear → BatchNorm1d hidden layers, or no head at all.

Smaller strategies: :func:`cnn_architectures` (no channels-last/LayerNorm blocks),
:func:`conv_nets_with_bn_relu_conv` (at least one BN→ReLU→Conv chain),
``architectures(kinds=(...))`` for any subset of :data:`BLOCK_KINDS`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

MAX_CHANNELS = 24
BATCH = 2

# --------------------------------------------------------------------------------------------
# Spellings
# --------------------------------------------------------------------------------------------
RELU_SPELLINGS = ("module", "module_inplace", "functional", "functional_inplace", "torch", "torch_inplace",
                  "method", "method_inplace")
_RELU_TEXT = {"module": "nn.ReLU()", "module_inplace": "nn.ReLU(inplace=True)", "functional": "F.relu(x)",
              "functional_inplace": "F.relu(x, inplace=True)", "torch": "torch.relu(x)",
              "torch_inplace": "torch.relu_(x)", "method": "x.relu()", "method_inplace": "x.relu_()"}
ADD_SPELLINGS = ("operator", "inplace", "torch", "method")
_ADD_TEXT = {"operator": "a + b", "inplace": "a += b", "torch": "torch.add(a, b)", "method": "a.add(b)"}
MUL_SPELLINGS = ("operator", "torch", "method")
_MUL_TEXT = {"operator": "x * s", "torch": "torch.mul(x, s)", "method": "x.mul(s)"}
FLATTEN_SPELLINGS = ("torch", "view", "method", "module", "reshape")
_FLATTEN_TEXT = {"torch": "torch.flatten(x, 1)", "view": "x.view(x.size(0), -1)", "method": "x.flatten(1)",
                 "module": "nn.Flatten()", "reshape": "x.reshape(x.shape[0], -1)"}

BLOCK_KINDS = ("conv", "preact", "residual", "dense", "se", "spatial_attention", "shuffle", "split",
               "convnext", "pool", "dropout", "fanout")
CNN_BLOCK_KINDS = tuple(k for k in BLOCK_KINDS if k != "convnext")

ALL_CONSTRUCTS = frozenset(
    {"conv", "strided_conv", "depthwise_conv", "grouped_conv", "batchnorm", "post_activation", "pre_activation"}
    | {f"relu_{s}" for s in RELU_SPELLINGS}
    | {"residual_add", "identity_shortcut", "projection_shortcut", "add_inplace", "dense_concat", "se_multiply",
       "spatial_attention", "channel_shuffle", "chunk_branches", "split_branches", "channels_last_layernorm",
       "layer_scale", "conv_multi_user", "dropout", "max_pool", "avg_pool", "adaptive_pool"}
    | {f"flatten_{s}" for s in FLATTEN_SPELLINGS}
    | {"global_pool_head", "flatten_map", "linear_head", "linear_bn1d", "no_head"})


def make_relu(spelling: str | None) -> nn.Module | None:
    if spelling in ("module", "module_inplace"):
        return nn.ReLU(inplace=spelling == "module_inplace")
    return None


def apply_relu(x: torch.Tensor, spelling: str, module: nn.Module | None) -> torch.Tensor:
    """ReLU in the given spelling (callers only pass freshly computed tensors, so in-place is safe)."""
    if module is not None:
        return module(x)
    if spelling == "functional":
        return F.relu(x)
    if spelling == "functional_inplace":
        return F.relu(x, inplace=True)
    if spelling == "torch":
        return torch.relu(x)
    if spelling == "torch_inplace":
        return torch.relu_(x)
    if spelling == "method":
        return x.relu()
    if spelling == "method_inplace":
        return x.relu_()
    raise ValueError(spelling)


def apply_add(a: torch.Tensor, b: torch.Tensor, spelling: str) -> torch.Tensor:
    if spelling == "operator":
        return a + b
    if spelling == "inplace":
        a += b
        return a
    if spelling == "torch":
        return torch.add(a, b)
    return a.add(b)


def apply_mul(x: torch.Tensor, s: torch.Tensor, spelling: str) -> torch.Tensor:
    if spelling == "operator":
        return x * s
    if spelling == "torch":
        return torch.mul(x, s)
    return x.mul(s)


def channel_shuffle(x: torch.Tensor, groups: int, spelling: str) -> torch.Tensor:
    """ShuffleNet's channel shuffle, read from the tensor's shape at run time (as torchvision does)."""
    n, c, h, w = x.size()
    if spelling == "view_transpose":
        x = x.view(n, groups, c // groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(n, -1, h, w)
    x = x.reshape(n, groups, -1, h, w).permute(0, 2, 1, 3, 4)
    return x.reshape(n, c, h, w)


def _conv_out(size: int, k: int, s: int) -> int:
    return (size + 2 * (k // 2) - k) // s + 1


# --------------------------------------------------------------------------------------------
# Units: the pieces blocks are made of
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvUnit:
    """Post-activation unit: Conv2d → [BatchNorm2d] → [ReLU in some spelling]."""
    cin: int
    cout: int
    kernel: int = 3
    stride: int = 1
    groups: int = 1
    bias: bool = False
    bn: bool = True
    relu: str | None = "module"

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        return _conv_out(h, self.kernel, self.stride), _conv_out(w, self.kernel, self.stride)

    def constructs(self) -> set[str]:
        c = {"conv"}
        if self.stride > 1:
            c.add("strided_conv")
        if self.groups > 1 and self.groups == self.cin:
            c.add("depthwise_conv")
        elif self.groups > 1:
            c.add("grouped_conv")
        if self.bn:
            c.add("batchnorm")
        if self.relu:
            c.add(f"relu_{self.relu}")
        if self.bn and self.relu:
            c.add("post_activation")
        return c

    def __repr__(self) -> str:
        g = "" if self.groups == 1 else (" dw" if self.groups == self.cin else f" g{self.groups}")
        s = "" if self.stride == 1 else f" s{self.stride}"
        b = "+bias" if self.bias else ""
        return (f"Conv{self.kernel}x{self.kernel}({self.cin}→{self.cout}{g}{s}{b})"
                + (" → BN" if self.bn else "") + (f" → {_RELU_TEXT[self.relu]}" if self.relu else ""))

    def make(self) -> nn.Module:
        return ConvUnitModule(self)


class ConvUnitModule(nn.Module):
    def __init__(self, spec: ConvUnit):
        super().__init__()
        self.conv = nn.Conv2d(spec.cin, spec.cout, spec.kernel, spec.stride, spec.kernel // 2, groups=spec.groups,
                              bias=spec.bias)
        self.bn = nn.BatchNorm2d(spec.cout) if spec.bn else None
        self.act = make_relu(spec.relu)
        self.relu_spelling = spec.relu

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu_spelling is not None:
            x = apply_relu(x, self.relu_spelling, self.act)
        return x


@dataclass(frozen=True)
class PreActUnit:
    """Pre-activation unit: BatchNorm2d → ReLU → [Dropout] → Conv2d (DenseNet / pre-act ResNet)."""
    cin: int
    cout: int
    kernel: int = 3
    stride: int = 1
    relu: str = "module"
    dropout: str | None = None  # None, "module", "functional"

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        return _conv_out(h, self.kernel, self.stride), _conv_out(w, self.kernel, self.stride)

    def constructs(self) -> set[str]:
        c = {"conv", "batchnorm", "pre_activation", f"relu_{self.relu}"}
        if self.stride > 1:
            c.add("strided_conv")
        if self.dropout:
            c.add("dropout")
        return c

    def __repr__(self) -> str:
        d = {None: "", "module": " → nn.Dropout", "functional": " → F.dropout"}[self.dropout]
        s = "" if self.stride == 1 else f" s{self.stride}"
        return f"BN({self.cin}) → {_RELU_TEXT[self.relu]}{d} → Conv{self.kernel}x{self.kernel}({self.cin}→{self.cout}{s})"

    def make(self) -> nn.Module:
        return PreActUnitModule(self)


class PreActUnitModule(nn.Module):
    def __init__(self, spec: PreActUnit):
        super().__init__()
        self.bn = nn.BatchNorm2d(spec.cin)
        self.act = make_relu(spec.relu)
        self.relu_spelling = spec.relu
        self.dropout_spelling = spec.dropout
        self.drop = nn.Dropout(0.2) if spec.dropout == "module" else None
        self.conv = nn.Conv2d(spec.cin, spec.cout, spec.kernel, spec.stride, spec.kernel // 2, bias=False)

    def forward(self, x):
        x = apply_relu(self.bn(x), self.relu_spelling, self.act)
        if self.drop is not None:
            x = self.drop(x)
        elif self.dropout_spelling == "functional":
            x = F.dropout(x, 0.2, self.training)
        return self.conv(x)


def _run_units(units: nn.ModuleList, x):
    for u in units:
        x = u(x)
    return x


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    cin: int
    cout: int

    def constructs(self) -> set[str]:
        return set()

    def make(self) -> nn.Module:
        raise NotImplementedError


@dataclass(frozen=True)
class SequenceBlock(Block):
    """A chain of conv units (post- or pre-activation)."""
    units: tuple = ()

    def constructs(self):
        return set().union(*(u.constructs() for u in self.units))

    def __repr__(self):
        return " → ".join(f"[{u!r}]" for u in self.units)

    def make(self):
        return SequenceModule(self)


class SequenceModule(nn.Module):
    def __init__(self, spec: SequenceBlock):
        super().__init__()
        self.units = nn.ModuleList(u.make() for u in spec.units)

    def forward(self, x):
        return _run_units(self.units, x)


@dataclass(frozen=True)
class ResidualBlock(Block):
    """out = [relu](body(x) + shortcut(x)); shortcut is identity or a projection ConvUnit."""
    body: tuple = ()
    shortcut: ConvUnit | None = None
    add: str = "operator"
    relu: str | None = None

    def constructs(self):
        c = set().union(*(u.constructs() for u in self.body)) | {"residual_add"}
        c |= self.shortcut.constructs() | {"projection_shortcut"} if self.shortcut else {"identity_shortcut"}
        if self.add == "inplace":
            c.add("add_inplace")
        if self.relu:
            c.add(f"relu_{self.relu}")
        return c

    def __repr__(self):
        sc = repr(self.shortcut) if self.shortcut else "identity"
        act = f" then {_RELU_TEXT[self.relu]}" if self.relu else ""
        return (f"Residual({self.cin}→{self.cout}; body: " + " → ".join(f"[{u!r}]" for u in self.body)
                + f"; shortcut: {sc}; {_ADD_TEXT[self.add]}{act})")

    def make(self):
        return ResidualModule(self)


class ResidualModule(nn.Module):
    def __init__(self, spec: ResidualBlock):
        super().__init__()
        self.body = nn.ModuleList(u.make() for u in spec.body)
        self.shortcut = spec.shortcut.make() if spec.shortcut else None
        self.add_spelling = spec.add
        self.relu_spelling = spec.relu
        self.act = make_relu(spec.relu)

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        out = apply_add(_run_units(self.body, x), identity, self.add_spelling)
        if self.relu_spelling is not None:
            out = apply_relu(out, self.relu_spelling, self.act)
        return out


@dataclass(frozen=True)
class DenseBlock(Block):
    """DenseNet units: each layer reads the concat of all previous features; output = concat of all."""
    layers: tuple = ()  # tuple of tuples of PreActUnit
    cat: str = "list"   # "list": torch.cat([...], 1), "tuple": torch.cat(tuple, dim=1), "concat": torch.concat

    def constructs(self):
        return set().union(*(u.constructs() for layer in self.layers for u in layer)) | {"dense_concat"}

    def __repr__(self):
        inner = "; ".join(" → ".join(f"[{u!r}]" for u in layer) for layer in self.layers)
        return f"Dense({self.cin}→{self.cout}, cat={self.cat}; {inner})"

    def make(self):
        return DenseModule(self)


class DenseModule(nn.Module):
    def __init__(self, spec: DenseBlock):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(*(u.make() for u in layer)) for layer in spec.layers)
        self.cat = spec.cat

    def _cat(self, features):
        if self.cat == "list":
            return torch.cat(features, 1)
        if self.cat == "tuple":
            return torch.cat(tuple(features), dim=1)
        return torch.concat(features, dim=1)

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(self._cat(features)))
        return self._cat(features)


@dataclass(frozen=True)
class SEBlock(Block):
    """x * gate(fc(gap(x))) with an N×C×1×1 operand (squeeze-and-excitation)."""
    reduced: int = 2
    gap: str = "adaptive"   # "adaptive" (module), "functional", "mean"
    fc: str = "conv"        # "conv" (1×1 convs), "linear" (Linear on N×C, then view / [:, :, None, None])
    relu: str = "module"
    gate: str = "sigmoid"   # "sigmoid" (torch.sigmoid), "module" (nn.Sigmoid), "hardsigmoid"
    mul: str = "operator"

    def constructs(self):
        return {"se_multiply", f"relu_{self.relu}"} | ({"conv"} if self.fc == "conv" else set()) | \
            ({"adaptive_pool"} if self.gap != "mean" else set())

    def __repr__(self):
        return (f"SE({self.cin}, squeeze {self.reduced}, gap={self.gap}, fc={self.fc}, {_RELU_TEXT[self.relu]}, "
                f"gate={self.gate}, {_MUL_TEXT[self.mul]})")

    def make(self):
        return SEModule(self)


class SEModule(nn.Module):
    def __init__(self, spec: SEBlock):
        super().__init__()
        self.spec_gap, self.spec_fc, self.spec_gate, self.spec_mul = spec.gap, spec.fc, spec.gate, spec.mul
        self.pool = nn.AdaptiveAvgPool2d(1) if spec.gap == "adaptive" else None
        if spec.fc == "conv":
            self.fc1 = nn.Conv2d(spec.cin, spec.reduced, 1)
            self.fc2 = nn.Conv2d(spec.reduced, spec.cin, 1)
        else:
            self.fc1 = nn.Linear(spec.cin, spec.reduced)
            self.fc2 = nn.Linear(spec.reduced, spec.cin)
        self.act = make_relu(spec.relu)
        self.relu_spelling = spec.relu
        self.sigmoid = nn.Sigmoid() if spec.gate == "module" else None

    def forward(self, x):
        if self.pool is not None:
            s = self.pool(x)
        elif self.spec_gap == "functional":
            s = F.adaptive_avg_pool2d(x, 1)
        else:
            s = x.mean((2, 3), keepdim=True)
        if self.spec_fc == "linear":
            s = s.flatten(1)
        s = self.fc2(apply_relu(self.fc1(s), self.relu_spelling, self.act))
        if self.sigmoid is not None:
            s = self.sigmoid(s)
        elif self.spec_gate == "hardsigmoid":
            s = F.hardsigmoid(s)
        else:
            s = torch.sigmoid(s)
        if self.spec_fc == "linear":
            s = s[:, :, None, None] if self.spec_gap == "mean" else s.view(s.size(0), -1, 1, 1)
        return apply_mul(x, s, self.spec_mul)


@dataclass(frozen=True)
class SpatialAttentionBlock(Block):
    """x * sigmoid(conv(...)) with an N×1×H×W operand: from x itself, or CBAM's [mean, max] over channels."""
    kind: str = "conv"  # "conv" or "cbam"
    kernel: int = 3
    mul: str = "operator"

    def constructs(self):
        return {"spatial_attention", "conv"}

    def __repr__(self):
        return f"SpatialAttention({self.cin}, {self.kind}, k{self.kernel}, {_MUL_TEXT[self.mul]})"

    def make(self):
        return SpatialAttentionModule(self)


class SpatialAttentionModule(nn.Module):
    def __init__(self, spec: SpatialAttentionBlock):
        super().__init__()
        self.kind, self.mul_spelling = spec.kind, spec.mul
        self.conv = nn.Conv2d(spec.cin if spec.kind == "conv" else 2, 1, spec.kernel, padding=spec.kernel // 2)

    def forward(self, x):
        if self.kind == "cbam":
            a = torch.cat([x.mean(dim=1, keepdim=True), torch.amax(x, dim=1, keepdim=True)], dim=1)
        else:
            a = x
        return apply_mul(x, torch.sigmoid(self.conv(a)), self.mul_spelling)


@dataclass(frozen=True)
class ShuffleBlock(Block):
    """[pointwise conv to a multiple of groups] → channel shuffle → [grouped conv]."""
    pre: ConvUnit | None = None
    groups: int = 2
    spelling: str = "view_transpose"  # or "reshape_permute"
    post: ConvUnit | None = None

    def constructs(self):
        c = {"channel_shuffle"}
        for u in (self.pre, self.post):
            if u is not None:
                c |= u.constructs()
        return c

    def __repr__(self):
        pre = f"[{self.pre!r}] → " if self.pre else ""
        post = f" → [{self.post!r}]" if self.post else ""
        return f"{pre}ChannelShuffle(g={self.groups}, {self.spelling}){post}"

    def make(self):
        return ShuffleModule(self)


class ShuffleModule(nn.Module):
    def __init__(self, spec: ShuffleBlock):
        super().__init__()
        self.pre = spec.pre.make() if spec.pre else None
        self.post = spec.post.make() if spec.post else None
        self.groups, self.spelling = spec.groups, spec.spelling

    def forward(self, x):
        if self.pre is not None:
            x = self.pre(x)
        x = channel_shuffle(x, self.groups, self.spelling)
        if self.post is not None:
            x = self.post(x)
        return x


@dataclass(frozen=True)
class SplitBlock(Block):
    """ShuffleNet v2 unit: split channels in two, transform one part, cat back, [shuffle]."""
    split: str = "chunk"        # "chunk" (x.chunk(2, 1)), "torch_chunk", "split" (torch.split(x, [a, b], 1))
    first: int = 1              # channels of the untouched part (for "split")
    branch: tuple = ()
    shuffle: bool = False

    def constructs(self):
        c = set().union(*(u.constructs() for u in self.branch))
        c.add("chunk_branches" if "chunk" in self.split else "split_branches")
        if self.shuffle:
            c.add("channel_shuffle")
        return c

    def __repr__(self):
        sp = f"split [{self.first}, {self.cin - self.first}]" if self.split == "split" else self.split
        return (f"Split({self.cin}, {sp}; branch: " + " → ".join(f"[{u!r}]" for u in self.branch)
                + f"; cat{'; shuffle' if self.shuffle else ''})")

    def make(self):
        return SplitModule(self)


class SplitModule(nn.Module):
    def __init__(self, spec: SplitBlock):
        super().__init__()
        self.split, self.first, self.shuffle = spec.split, spec.first, spec.shuffle
        self.sizes = [spec.first, spec.cin - spec.first]
        self.branch = nn.ModuleList(u.make() for u in spec.branch)

    def forward(self, x):
        if self.split == "chunk":
            x1, x2 = x.chunk(2, dim=1)
        elif self.split == "torch_chunk":
            x1, x2 = torch.chunk(x, 2, 1)
        else:
            x1, x2 = torch.split(x, self.sizes, dim=1)
        out = torch.cat((x1, _run_units(self.branch, x2)), dim=1)
        if self.shuffle:
            out = channel_shuffle(out, 2, "view_transpose")
        return out


@dataclass(frozen=True)
class ConvNeXtBlock(Block):
    """[depthwise conv] → permute(0,2,3,1) → LayerNorm → Linear → GELU → Linear → [layer scale]
    → permute(0,3,1,2) → [+ x]."""
    dw_kernel: int | None = 3
    hidden: int = 8
    layer_scale: bool = False
    residual: bool = True

    def constructs(self):
        c = {"channels_last_layernorm"}
        if self.dw_kernel:
            c |= {"conv", "depthwise_conv"}
        if self.layer_scale:
            c.add("layer_scale")
        if self.residual:
            c |= {"residual_add", "identity_shortcut"}
        return c

    def __repr__(self):
        dw = f"dwConv{self.dw_kernel} → " if self.dw_kernel else ""
        return (f"ConvNeXt({self.cin}→{self.cout}: {dw}permute → LN → Linear({self.cin}→{self.hidden}) → GELU → "
                f"Linear(→{self.cout}){' → γ·' if self.layer_scale else ''} → permute{' → + x' if self.residual else ' → .contiguous()'})")

    def make(self):
        return ConvNeXtModule(self)


class ConvNeXtModule(nn.Module):
    def __init__(self, spec: ConvNeXtBlock):
        super().__init__()
        k = spec.dw_kernel
        self.dwconv = nn.Conv2d(spec.cin, spec.cin, k, padding=k // 2, groups=spec.cin) if k else None
        self.norm = nn.LayerNorm(spec.cin, eps=1e-6)
        self.pwconv1 = nn.Linear(spec.cin, spec.hidden)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(spec.hidden, spec.cout)
        self.gamma = nn.Parameter(torch.rand(spec.cout) + 0.5) if spec.layer_scale else None
        self.residual = spec.residual

    def forward(self, x):
        y = self.dwconv(x) if self.dwconv is not None else x
        y = y.permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        y = y.permute(0, 3, 1, 2)
        return x + y if self.residual else y.contiguous()


@dataclass(frozen=True)
class PoolBlock(Block):
    kind: str = "max"          # "max", "avg", "adaptive_avg", "adaptive_max"
    functional: bool = False
    kernel: int = 2
    stride: int = 2
    padding: int = 0
    out_size: int = 2          # for adaptive pooling

    def constructs(self):
        return {{"max": "max_pool", "avg": "avg_pool"}.get(self.kind, "adaptive_pool")}

    def __repr__(self):
        if self.kind.startswith("adaptive"):
            args = f"{self.out_size}"
        else:
            args = f"k{self.kernel} s{self.stride} p{self.padding}"
        return f"{'F.' if self.functional else 'nn.'}{self.kind}_pool({args})"

    def make(self):
        return PoolModule(self)


class PoolModule(nn.Module):
    def __init__(self, spec: PoolBlock):
        super().__init__()
        self.kind, self.functional = spec.kind, spec.functional
        self.k, self.s, self.p, self.out_size = spec.kernel, spec.stride, spec.padding, spec.out_size
        if not spec.functional:
            self.pool = {"max": lambda: nn.MaxPool2d(self.k, self.s, self.p),
                         "avg": lambda: nn.AvgPool2d(self.k, self.s, self.p),
                         "adaptive_avg": lambda: nn.AdaptiveAvgPool2d(self.out_size),
                         "adaptive_max": lambda: nn.AdaptiveMaxPool2d(self.out_size)}[spec.kind]()

    def forward(self, x):
        if not self.functional:
            return self.pool(x)
        if self.kind == "max":
            return F.max_pool2d(x, self.k, self.s, self.p)
        if self.kind == "avg":
            return F.avg_pool2d(x, self.k, self.s, self.p)
        if self.kind == "adaptive_avg":
            return F.adaptive_avg_pool2d(x, self.out_size)
        return F.adaptive_max_pool2d(x, self.out_size)


@dataclass(frozen=True)
class DropoutBlock(Block):
    kind: str = "module"  # "module", "dropout2d", "functional"

    def constructs(self):
        return {"dropout"}

    def __repr__(self):
        return {"module": "nn.Dropout(0.3)", "dropout2d": "nn.Dropout2d(0.3)", "functional": "F.dropout(x, 0.3)"}[self.kind]

    def make(self):
        return DropoutModule(self)


class DropoutModule(nn.Module):
    def __init__(self, spec: DropoutBlock):
        super().__init__()
        self.kind = spec.kind
        self.drop = {"module": nn.Dropout(0.3), "dropout2d": nn.Dropout2d(0.3)}.get(spec.kind)

    def forward(self, x):
        if self.drop is not None:
            return self.drop(x)
        return F.dropout(x, 0.3, training=self.training)


@dataclass(frozen=True)
class FanoutBlock(Block):
    """A conv output with two users: y = conv(x); out = relu(bn(y)) + y (BN cannot be folded here)."""
    relu: str = "module"

    def constructs(self):
        return {"conv", "batchnorm", "conv_multi_user", "residual_add", f"relu_{self.relu}"}

    def __repr__(self):
        return f"Fanout(y = Conv3x3({self.cin}→{self.cout})(x); {_RELU_TEXT[self.relu]}(BN(y)) + y)"

    def make(self):
        return FanoutModule(self)


class FanoutModule(nn.Module):
    def __init__(self, spec: FanoutBlock):
        super().__init__()
        self.conv = nn.Conv2d(spec.cin, spec.cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(spec.cout)
        self.act = make_relu(spec.relu)
        self.relu_spelling = spec.relu

    def forward(self, x):
        y = self.conv(x)
        return apply_relu(self.bn(y), self.relu_spelling, self.act) + y


@dataclass(frozen=True)
class HeadSpec:
    """[global pool] → [flatten] → [Linear → [BN1d] → ReLU → [Dropout]] → Linear."""
    features: int                 # inputs of the first Linear
    pool: str | None = "adaptive"  # "adaptive", "functional", "mean_keepdim", "mean" (no flatten), None (flatten a map)
    flatten: str | None = "torch"
    hidden: int | None = None
    bn1d: bool = False
    relu: str = "module"
    dropout: bool = False
    classes: int = 10

    def constructs(self):
        c = {"linear_head"}
        c.add("global_pool_head" if self.pool else "flatten_map")
        if self.pool in ("adaptive", "functional"):
            c.add("adaptive_pool")
        if self.flatten:
            c.add(f"flatten_{self.flatten}")
        if self.hidden:
            c.add(f"relu_{self.relu}")
            if self.bn1d:
                c |= {"linear_bn1d", "batchnorm"}
            if self.dropout:
                c.add("dropout")
        return c

    def __repr__(self):
        parts = []
        if self.pool:
            parts.append({"adaptive": "nn.AdaptiveAvgPool2d(1)", "functional": "F.adaptive_avg_pool2d(x, 1)",
                          "mean_keepdim": "x.mean((2, 3), keepdim=True)", "mean": "x.mean([2, 3])"}[self.pool])
        if self.flatten:
            parts.append(_FLATTEN_TEXT[self.flatten])
        if self.hidden:
            parts.append(f"Linear({self.features}→{self.hidden})" + (" → BN1d" if self.bn1d else "")
                         + f" → {_RELU_TEXT[self.relu]}" + (" → Dropout" if self.dropout else ""))
            parts.append(f"Linear({self.hidden}→{self.classes})")
        else:
            parts.append(f"Linear({self.features}→{self.classes})")
        return " → ".join(parts)


class HeadModule(nn.Module):
    def __init__(self, spec: HeadSpec):
        super().__init__()
        self.pool_spelling, self.flatten_spelling = spec.pool, spec.flatten
        self.pool = nn.AdaptiveAvgPool2d(1) if spec.pool == "adaptive" else None
        self.flat = nn.Flatten() if spec.flatten == "module" else None
        layers: list[nn.Module] = []
        if spec.hidden:
            layers.append(nn.Linear(spec.features, spec.hidden))
            if spec.bn1d:
                layers.append(nn.BatchNorm1d(spec.hidden))
            layers.append(nn.ReLU(inplace=spec.relu == "module_inplace"))
            if spec.dropout:
                layers.append(nn.Dropout(0.5))
            layers.append(nn.Linear(spec.hidden, spec.classes))
        else:
            layers.append(nn.Linear(spec.features, spec.classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x):
        if self.pool is not None:
            x = self.pool(x)
        elif self.pool_spelling == "functional":
            x = F.adaptive_avg_pool2d(x, 1)
        elif self.pool_spelling == "mean_keepdim":
            x = x.mean((2, 3), keepdim=True)
        elif self.pool_spelling == "mean":
            x = x.mean([2, 3])
        if self.flat is not None:
            x = self.flat(x)
        elif self.flatten_spelling == "torch":
            x = torch.flatten(x, 1)
        elif self.flatten_spelling == "view":
            x = x.view(x.size(0), -1)
        elif self.flatten_spelling == "method":
            x = x.flatten(1)
        elif self.flatten_spelling == "reshape":
            x = x.reshape(x.shape[0], -1)
        return self.classifier(x)


# --------------------------------------------------------------------------------------------
# The architecture and its model
# --------------------------------------------------------------------------------------------
class GeneratedNet(nn.Module):
    """The model an :class:`Architecture` builds: ``head(features(x))``."""

    def __init__(self, arch: "Architecture"):
        super().__init__()
        self.features = nn.Sequential(*(b.make() for b in arch.blocks))
        self.head = HeadModule(arch.head) if arch.head is not None else None

    def forward(self, x):
        x = self.features(x)
        if self.head is not None:
            x = self.head(x)
        return x


def randomize_norm_layers(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Random running statistics and affine parameters for every BatchNorm/LayerNorm (in place),
    so that no norm layer is an identity. Returns ``model``."""
    g = generator
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_((torch.rand(n, generator=g) + 0.5) * torch.where(
                        torch.rand(n, generator=g) < 0.2, -1.0, 1.0))
                    m.bias.copy_(torch.randn(n, generator=g) * 0.5)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


@dataclass(frozen=True)
class Architecture:
    """A drawn architecture: plain data. ``build()`` makes a fresh model (weights seeded by ``seed``)."""
    in_channels: int
    height: int
    width: int
    blocks: tuple
    head: HeadSpec | None
    seed: int = 0
    batch: int = BATCH
    out_shape: tuple = field(default=(), compare=False)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.height, self.width)

    @property
    def constructs(self) -> frozenset[str]:
        c: set[str] = set()
        for b in self.blocks:
            c |= b.constructs()
        c |= self.head.constructs() if self.head is not None else {"no_head"}
        return frozenset(c)

    def build(self) -> nn.Module:
        """A fresh model in eval mode; the same architecture always builds the same weights."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = GeneratedNet(self)
            randomize_norm_layers(model)
        return model.eval()

    def example_inputs(self, seed: int | None = None) -> tuple[torch.Tensor]:
        """A deterministic random input of ``input_shape`` (seeded by ``seed``, default ``self.seed``)."""
        g = torch.Generator().manual_seed(self.seed if seed is None else seed)
        return (torch.randn(self.input_shape, generator=g),)

    def _repr_pretty_(self, p, cycle) -> None:  # Hypothesis and IPython print this
        p.text(repr(self))

    def __repr__(self) -> str:
        lines = [f"Architecture(input {'x'.join(map(str, self.input_shape))}, seed={self.seed}, "
                 f"output {'x'.join(map(str, self.out_shape))}"]
        for i, b in enumerate(self.blocks):
            lines.append(f"  features.{i}: {b!r}")
        lines.append(f"  head: {self.head!r}" if self.head is not None else "  head: none")
        lines.append(")")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------
class _State:
    def __init__(self, c: int, h: int, w: int):
        self.c, self.h, self.w = c, h, w


def _relu(draw) -> str:
    return draw(st.sampled_from(RELU_SPELLINGS))


#: while an architecture is drawn: every drawn width is a multiple of this (``width_multiple=``)
_WIDTH_MULTIPLE = [1]


def _width(draw, multiple_of: int = 1, lo: int = 2, hi: int = MAX_CHANNELS) -> int:
    multiple_of = math.lcm(multiple_of, _WIDTH_MULTIPLE[0])
    m = draw(st.integers(max(1, -(-lo // multiple_of)), max(1, hi // multiple_of)))
    return m * multiple_of


def _can_stride(s: _State) -> bool:
    return min(s.h, s.w) >= 6


def _conv_unit(draw, s: _State, *, cout: int | None = None, kernel: int | None = None, relu: bool | None = None,
               kind: str | None = None, stride: int | None = None, bn: bool | None = None,
               groups: int | None = None) -> ConvUnit:
    """Draw a conv unit reading s.c channels (``kind``: standard, depthwise or grouped; a grouped
    unit falls back to standard when s.c has no divisor in [2, s.c)); updates ``s``."""
    kind = kind or draw(st.sampled_from(("standard", "depthwise", "grouped")))
    divisors = [g for g in range(2, s.c) if s.c % g == 0] if groups is None else [groups]
    if kind == "grouped" and not divisors:
        kind = "standard"
    if kind == "depthwise" and s.c < 2:
        kind = "standard"
    if kind == "depthwise":
        groups = s.c
        cout = s.c * draw(st.sampled_from((1, 2))) if cout is None else cout
        cout = cout if cout <= MAX_CHANNELS else s.c
        kernel = kernel or draw(st.sampled_from((3, 5)))
    elif kind == "grouped":
        groups = draw(st.sampled_from(divisors))
        cout = _width(draw, multiple_of=groups) if cout is None else cout
        kernel = kernel or draw(st.sampled_from((1, 3)))
    else:
        groups = 1
        cout = _width(draw) if cout is None else cout
        kernel = kernel or draw(st.sampled_from((1, 3)))
    if stride is None:
        stride = 2 if _can_stride(s) and draw(st.integers(0, 3)) == 0 else 1
    unit = ConvUnit(s.c, cout, kernel, stride, groups,
                    bias=draw(st.booleans()),
                    bn=draw(st.integers(0, 4)) > 0 if bn is None else bn,
                    relu=(_relu(draw) if draw(st.integers(0, 3)) > 0 else None) if relu is None
                    else (_relu(draw) if relu else None))
    s.c = cout
    s.h, s.w = unit.out_hw(s.h, s.w)
    return unit


def _preact_unit(draw, s: _State, *, cout: int | None = None, kernel: int | None = None,
                 stride: int | None = None) -> PreActUnit:
    cout = _width(draw) if cout is None else cout
    kernel = kernel or draw(st.sampled_from((1, 3)))
    if stride is None:
        stride = 2 if _can_stride(s) and draw(st.integers(0, 4)) == 0 else 1
    dropout = draw(st.sampled_from((None, None, None, "module", "functional")))
    unit = PreActUnit(s.c, cout, kernel, stride, _relu(draw), dropout)
    s.c = cout
    s.h, s.w = unit.out_hw(s.h, s.w)
    return unit


def _adapt_to_multiple(draw, s: _State, multiple: int) -> ConvUnit | None:
    """A pointwise conv unit to a width divisible by ``multiple`` when s.c is not (or sometimes anyway)."""
    if s.c % multiple == 0 and s.c >= multiple and draw(st.booleans()):
        return None
    return _conv_unit(draw, s, cout=_width(draw, multiple_of=multiple, lo=max(2, multiple)), kernel=1,
                      kind="standard", stride=1)


def _draw_block(draw, kind: str, s: _State) -> Block:
    cin = s.c
    if kind == "conv":
        units = tuple(_conv_unit(draw, s) for _ in range(draw(st.integers(1, 3))))
        return SequenceBlock(cin, s.c, units)
    if kind == "preact":
        units = tuple(_preact_unit(draw, s) for _ in range(draw(st.integers(1, 3))))
        return SequenceBlock(cin, s.c, units)
    if kind == "residual":
        return _draw_residual(draw, s)
    if kind == "dense":
        return _draw_dense(draw, s)
    if kind == "se":
        return SEBlock(cin, cin, reduced=draw(st.integers(1, max(1, cin // 2))),
                       gap=draw(st.sampled_from(("adaptive", "functional", "mean"))),
                       fc=draw(st.sampled_from(("conv", "linear"))), relu=_relu(draw),
                       gate=draw(st.sampled_from(("sigmoid", "module", "hardsigmoid"))),
                       mul=draw(st.sampled_from(MUL_SPELLINGS)))
    if kind == "spatial_attention":
        return SpatialAttentionBlock(cin, cin, draw(st.sampled_from(("conv", "cbam"))), draw(st.sampled_from((1, 3))),
                                     draw(st.sampled_from(MUL_SPELLINGS)))
    if kind == "shuffle":
        groups = draw(st.sampled_from((2, 3, 4)))
        pre = _adapt_to_multiple(draw, s, groups)
        c = s.c
        post = None
        if draw(st.booleans()):
            post = _conv_unit(draw, s, kind="grouped", groups=groups, cout=_width(draw, multiple_of=groups),
                              kernel=1, stride=1)
        spelling = draw(st.sampled_from(("view_transpose", "reshape_permute")))
        return ShuffleBlock(cin, s.c, pre, groups, spelling, post)
    if kind == "split":
        c = s.c
        split = draw(st.sampled_from(("chunk", "torch_chunk", "split")))
        first = (c + 1) // 2 if split != "split" else draw(st.integers(1, c - 1))
        b = _State(c - first, s.h, s.w)
        branch = (_conv_unit(draw, b, cout=c - first, kernel=1, kind="standard", stride=1),
                  _conv_unit(draw, b, cout=c - first, kind="depthwise", stride=1, relu=False),
                  _conv_unit(draw, b, cout=c - first, kernel=1, kind="standard", stride=1))
        shuffle = c % 2 == 0 and draw(st.booleans())
        return SplitBlock(c, c, split, first, branch, shuffle)
    if kind == "convnext":
        residual = draw(st.booleans())
        cout = cin if residual else _width(draw)
        block = ConvNeXtBlock(cin, cout, draw(st.sampled_from((None, 3, 5))), _width(draw, lo=2, hi=4 * MAX_CHANNELS // 2),
                              draw(st.booleans()), residual)
        s.c = cout
        return block
    if kind == "pool":
        return _draw_pool(draw, s)
    if kind == "dropout":
        return DropoutBlock(cin, cin, draw(st.sampled_from(("module", "dropout2d", "functional"))))
    if kind == "fanout":
        s.c = _width(draw)
        return FanoutBlock(cin, s.c, _relu(draw))
    raise ValueError(kind)


def _draw_residual(draw, s: _State) -> ResidualBlock:
    cin, h, w = s.c, s.h, s.w
    preact = draw(st.booleans())
    style = draw(st.sampled_from(("basic", "bottleneck")))
    stride = 2 if _can_stride(s) and draw(st.integers(0, 3)) == 0 else 1
    cout = cin if draw(st.booleans()) else _width(draw)
    body_state = _State(cin, h, w)
    if preact:
        if style == "basic":
            body = (_preact_unit(draw, body_state, kernel=3, stride=stride),
                    _preact_unit(draw, body_state, cout=cout, kernel=3, stride=1))
        else:
            mid = _width(draw)
            body = (_preact_unit(draw, body_state, cout=mid, kernel=1, stride=1),
                    _preact_unit(draw, body_state, cout=mid, kernel=3, stride=stride),
                    _preact_unit(draw, body_state, cout=cout, kernel=1, stride=1))
    elif style == "basic":
        body = (_conv_unit(draw, body_state, kind="standard", kernel=3, stride=stride, relu=True),
                _conv_unit(draw, body_state, kind="standard", cout=cout, kernel=3, stride=1, relu=False))
    else:
        mid = _width(draw)
        body = (_conv_unit(draw, body_state, kind="standard", cout=mid, kernel=1, stride=1, relu=True),
                _conv_unit(draw, body_state, kind=draw(st.sampled_from(("grouped", "depthwise", "standard"))),
                           cout=None, kernel=3, stride=stride, relu=True),
                _conv_unit(draw, body_state, kind="standard", cout=cout, kernel=1, stride=1, relu=False))
    needs_projection = stride > 1 or cout != cin
    shortcut = None
    if needs_projection or draw(st.integers(0, 4)) == 0:
        shortcut = ConvUnit(cin, cout, 1, stride, 1, bias=False, bn=not preact, relu=None)
    s.c, s.h, s.w = cout, body_state.h, body_state.w
    relu = None if preact else (_relu(draw) if draw(st.integers(0, 4)) > 0 else None)
    return ResidualBlock(cin, cout, body, shortcut, draw(st.sampled_from(ADD_SPELLINGS)), relu)


def _draw_dense(draw, s: _State) -> DenseBlock:
    cin = s.c
    n_layers = draw(st.integers(1, 3))
    growth = draw(st.integers(2, 6))
    n_layers = max(1, min(n_layers, (32 - cin) // growth))
    layers = []
    c = cin
    for _ in range(n_layers):
        ls = _State(c, s.h, s.w)
        if draw(st.booleans()):  # bottleneck: BN-ReLU-Conv1x1 then BN-ReLU-Conv3x3
            layer = (_preact_unit(draw, ls, cout=_width(draw), kernel=1, stride=1),
                     _preact_unit(draw, ls, cout=growth, kernel=3, stride=1))
        else:
            layer = (_preact_unit(draw, ls, cout=growth, kernel=3, stride=1),)
        layers.append(layer)
        c += growth
    s.c = c
    return DenseBlock(cin, c, tuple(layers), draw(st.sampled_from(("list", "tuple", "concat"))))


def _draw_pool(draw, s: _State) -> PoolBlock:
    cin = s.c
    if min(s.h, s.w) < 4:
        kind = "adaptive_avg" if draw(st.booleans()) else "adaptive_max"
    else:
        kind = draw(st.sampled_from(("max", "avg", "adaptive_avg", "adaptive_max")))
    functional = draw(st.booleans())
    if kind.startswith("adaptive"):
        out = draw(st.integers(min(2, s.h, s.w), min(s.h, s.w)))
        s.h = s.w = out
        return PoolBlock(cin, cin, kind, functional, out_size=out)
    kernel, stride, padding = draw(st.sampled_from(((2, 2, 0), (3, 2, 1), (3, 1, 1))))
    s.h = (s.h + 2 * padding - kernel) // stride + 1
    s.w = (s.w + 2 * padding - kernel) // stride + 1
    return PoolBlock(cin, cin, kind, functional, kernel, stride, padding)


def _draw_head(draw, s: _State) -> HeadSpec | None:
    if draw(st.integers(0, 5)) == 0:
        return None
    if s.c * s.h * s.w <= 1024 and draw(st.integers(0, 2)) == 0:
        pool, features = None, s.c * s.h * s.w
    else:
        pool, features = draw(st.sampled_from(("adaptive", "functional", "mean_keepdim", "mean"))), s.c
    flatten = None if pool == "mean" else draw(st.sampled_from(FLATTEN_SPELLINGS))
    hidden = draw(st.one_of(st.none(), st.integers(2, 16)))
    return HeadSpec(features, pool, flatten, hidden, bn1d=hidden is not None and draw(st.booleans()),
                    relu=draw(st.sampled_from(("module", "module_inplace"))), dropout=draw(st.booleans()),
                    classes=draw(st.integers(2, 10)))


def architectures(kinds: Sequence[str] = BLOCK_KINDS, *, min_blocks: int = 1, max_blocks: int = 5,
                  head: bool | None = None, required: Sequence[str] = (),
                  width_multiple: int = 1) -> st.SearchStrategy[Architecture]:
    """Random valid architectures built from block ``kinds`` (see :data:`BLOCK_KINDS`).

    A stem (post-activation conv unit) comes first, then ``min_blocks``–``max_blocks`` blocks,
    then a head (``head=True``: always, ``False``: never, ``None``: usually). ``required`` block
    kinds are placed at drawn positions, so every drawn model contains them. ``width_multiple``:
    every width the strategy chooses is a multiple of it (widths that follow from others, such as
    a dense block's concatenation, need not be).
    """
    unknown = (set(kinds) | set(required)) - set(BLOCK_KINDS)
    if unknown:
        raise ValueError(f"unknown block kinds {sorted(unknown)}; known: {BLOCK_KINDS}")
    if not kinds or min_blocks < 0 or max_blocks < min_blocks:
        raise ValueError(f"need at least one kind and 0 <= min_blocks <= max_blocks, got {kinds}, "
                         f"{min_blocks}, {max_blocks}")
    if not isinstance(width_multiple, int) or not 1 <= width_multiple <= MAX_CHANNELS // 2:
        raise ValueError(f"width_multiple must be an int in [1, {MAX_CHANNELS // 2}], got {width_multiple!r}")
    return _architectures(tuple(kinds), min_blocks, max_blocks, head, tuple(required), width_multiple)


@st.composite
def _architectures(draw, kinds, min_blocks, max_blocks, head, required, width_multiple=1) -> Architecture:
    previous, _WIDTH_MULTIPLE[0] = _WIDTH_MULTIPLE[0], width_multiple
    try:
        return _draw_architecture(draw, kinds, min_blocks, max_blocks, head, required)
    finally:
        _WIDTH_MULTIPLE[0] = previous


def _draw_architecture(draw, kinds, min_blocks, max_blocks, head, required) -> Architecture:
    in_channels = draw(st.integers(1, 4))
    h, w = draw(st.integers(6, 16)), draw(st.integers(6, 16))
    s = _State(in_channels, h, w)
    stem = _conv_unit(draw, s, kind="standard", stride=1)
    blocks: list[Block] = [SequenceBlock(in_channels, s.c, (stem,))]
    n = draw(st.integers(max(min_blocks, len(required)), max(max_blocks, len(required))))
    plan = [draw(st.sampled_from(tuple(kinds))) for _ in range(n - len(required))]
    for k in required:
        plan.insert(draw(st.integers(0, len(plan))), k)
    for kind in plan:
        blocks.append(_draw_block(draw, kind, s))
    if head is None:
        head_spec = _draw_head(draw, s)
    elif head:
        head_spec = None
        while head_spec is None:
            head_spec = _draw_head(draw, s)
    else:
        head_spec = None
    seed = draw(st.integers(0, 2 ** 16))
    out_shape = (BATCH, head_spec.classes) if head_spec is not None else (BATCH, s.c, s.h, s.w)
    return Architecture(in_channels, h, w, tuple(blocks), head_spec, seed, BATCH, out_shape)


def cnn_architectures(**kw) -> st.SearchStrategy[Architecture]:
    """Architectures without channels-last LayerNorm blocks (only conv-net constructs)."""
    return architectures(CNN_BLOCK_KINDS, **kw)


@st.composite
def conv_nets_with_bn_relu_conv(draw, **kw) -> Architecture:
    """CNN architectures that contain at least one BN→ReLU→Conv chain (a pre-activation unit or a
    DenseNet block), the pattern selective convolutions rewrite."""
    kind = draw(st.sampled_from(("preact", "dense")))
    return draw(architectures(CNN_BLOCK_KINDS, required=(kind,) + tuple(kw.pop("required", ())), **kw))


# --------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------
def max_abs_difference(a: nn.Module, b: nn.Module, inputs: tuple) -> tuple[float, float]:
    """(max |a(x) - b(x)|, max |a(x)|) over the (tensor) outputs, computed in eval mode without grad.
    Both modules are returned in the training mode they had. ``inputs``: a tensor or a tuple."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    flags = [(m, m.training) for mod in (a, b) for m in mod.modules()]
    try:
        a.eval(), b.eval()
        with torch.no_grad():
            ya, yb = a(*inputs), b(*inputs)
    finally:
        for m, t in flags:
            m.training = t
    ya = ya if isinstance(ya, (tuple, list)) else (ya,)
    yb = yb if isinstance(yb, (tuple, list)) else (yb,)
    assert len(ya) == len(yb), f"{len(ya)} outputs vs {len(yb)}"
    diff, scale = 0.0, 0.0
    for u, v in zip(ya, yb):
        assert u.shape == v.shape, f"output shape {tuple(u.shape)} vs {tuple(v.shape)}"
        diff = max(diff, (u.double() - v.double()).abs().max().item())
        scale = max(scale, u.double().abs().max().item())
    return diff, scale


def assert_same_function(a: nn.Module, b: nn.Module, inputs: tuple, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Assert ``b`` computes what ``a`` computes on ``inputs`` (eval mode): error ≤ atol + rtol·max|a(x)|."""
    diff, scale = max_abs_difference(a, b, inputs)
    assert diff <= atol + rtol * scale, f"outputs differ: max abs error {diff:.3g} (output scale {scale:.3g})"


_REGISTRIES = ("_parameters", "_buffers", "_modules")


def _value(obj, seen: dict[int, object]):
    """A comparable copy of a plain attribute's value: tensors cloned (with dtype and device),
    containers copied element by element, modules and functions kept by identity (they are
    compared through their own snapshot, or as objects), everything else deep-copied or, when
    that fails, kept by identity."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", obj.detach().clone(), obj.dtype, obj.device, obj.requires_grad)
    if isinstance(obj, nn.Module) or callable(obj) and not isinstance(obj, type):
        return ("object", id(obj))
    if id(obj) in seen:
        return ("cycle", id(obj))
    seen[id(obj)] = obj
    if isinstance(obj, dict):
        return ("dict", type(obj), {k: _value(v, seen) for k, v in obj.items()})
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return (type(obj).__name__, [_value(v, seen) for v in items])
    try:
        return ("value", copy.deepcopy(obj))
    except Exception:  # noqa: BLE001 - not copyable: compare the object itself
        return ("object", id(obj))


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple) and a and a[0] == "tensor":
        return (b[0] == "tensor" and a[2:] == b[2:] and a[1].shape == b[1].shape
                and torch.equal(a[1].nan_to_num(), b[1].nan_to_num())
                and torch.equal(a[1].isnan(), b[1].isnan()))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable values: the same object only
        return a is b


def model_snapshot(model: nn.Module) -> dict:
    """Everything graphsel must not change in a user's model, by value: every parameter and
    buffer bit for bit (with its identity, dtype, device and requires_grad), every other instance
    attribute of every module (``stride``, ``padding``, dropout ``p``, cached tensors, ...),
    training flags, hooks and submodule identities."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "tensors": {f"{n}.{k}": (id(t), t.dtype, t.device, t.requires_grad, type(t))
                    for n, m in model.named_modules() for reg in (m._parameters, m._buffers)
                    for k, t in reg.items() if t is not None},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for n, m in model.named_modules()},
        "modules": {n: id(m) for n, m in model.named_modules()},
        "attributes": {n: {k: _value(v, {}) for k, v in vars(m).items() if k not in _REGISTRIES}
                       for n, m in model.named_modules()},
    }


def assert_model_unchanged(model: nn.Module, snapshot: dict) -> None:
    """Assert ``model`` still matches :func:`model_snapshot` taken earlier, value by value."""
    now = model_snapshot(model)
    for key in ("tensors", "training", "hooks", "modules"):
        assert now[key] == snapshot[key], f"the model's {key} changed"
    assert now["attributes"].keys() == snapshot["attributes"].keys()
    for name, attrs in snapshot["attributes"].items():
        assert now["attributes"][name].keys() == attrs.keys(), f"the attributes of module '{name}' changed"
        for k, v in attrs.items():
            assert _same(now["attributes"][name][k], v), f"attribute '{k}' of module '{name}' changed"
    assert now["state"].keys() == snapshot["state"].keys()
    for k, v in snapshot["state"].items():
        assert torch.equal(now["state"][k], v), f"the model's {k} changed"
