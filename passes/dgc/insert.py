"""ApplyDynamicGroupConv (``dynamic_group_conv``): replace eligible ``nn.Conv2d`` layers by
:class:`~.module.DynamicGroupConv2d`, absorbing a preceding ``BatchNorm2d → ReLU``.

Which convs, by ``placement``:

* ``"all"`` (default): every eligible conv; a conv without a preceding BN → ReLU gets none
  (``add_bn_relu=False``), so the insertion is exact.
* ``"paper"``: the paper's placement. Every DGC layer normalises and rectifies its own input
  (BN → ReLU absorbed when the graph has it, added otherwise: ``add_bn_relu`` defaults to True),
  the stem (a conv reading a model input) stays static, and by architecture family
  (``family="auto"`` detects it: DenseNet when a conv reads a concatenation through BN → ReLU,
  else ResNet):

  - **DenseNet family**: only the 1×1 convs are converted (the bottleneck convs that read the
    concatenated features; a DenseNet-BC transition's 1×1 conv too). The 3×3 convs stay static:
    the paper's CondenseNet-DGC replaces the 1×1 learned group convolution and keeps the 3×3
    (group) convolution;
  - **ResNet family** (and anything else): every eligible conv of the blocks — 3×3 and 1×1,
    projection shortcuts included; with them, torchvision's ResNet-18 at ξ = 0.55 counts 884.5 M
    MACs against the paper's 890 M.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch.fx as fx
import torch.nn as nn

from graphsel.analysis.patterns import BATCHNORM, BATCHNORM2D, CAT, CONV2D, DROPOUT, RELU, Pattern, first_input
from graphsel.errors import PassError
from graphsel.ir.graph import call_count, delete_unused_modules, replace_module
from graphsel.ir.meta import graphsel_meta
from graphsel.pipeline.passbase import Contract, Diagnostic, Pass, PassResult
from graphsel.pipeline.registry import register_pass

from .module import DynamicGroupConv2d, _check_heads, _check_init, _check_ratio, _check_squeeze

_ABSORB = Pattern(BATCHNORM2D, RELU, CONV2D)
Selector = Callable[[str, nn.Conv2d], bool]
PLACEMENTS = ("all", "paper")
FAMILIES = ("auto", "densenet", "resnet")


def _reads_concat(gm: fx.GraphModule, node: fx.Node, hops: int = 4) -> bool:
    """Whether the conv ``node`` reads a concatenation, directly or through BN / ReLU / dropout."""
    x = first_input(node)
    for _ in range(hops):
        if x is None:
            return False
        if CAT.matches(x, gm):
            return True
        if not any(op.matches(x, gm) for op in (BATCHNORM, RELU, DROPOUT)):
            return False
        x = first_input(x)
    return False


def detect_family(gm: fx.GraphModule) -> str:
    """``"densenet"`` when some conv reads a concatenation (through BN → ReLU), else ``"resnet"``."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Conv2d) \
                and _reads_concat(gm, node):
            return "densenet"
    return "resnet"


def _as_selector(value: Any, option: str) -> tuple[frozenset[str] | None, Selector | None]:
    if value is None:
        return None, None
    if isinstance(value, str):
        return frozenset([value]), None
    if callable(value):
        return None, value
    if isinstance(value, Iterable):
        items = list(value)
        bad = [v for v in items if not isinstance(v, str)]
        if bad:
            raise TypeError(f"ApplyDynamicGroupConv: {option} must hold module paths (str), got {bad[0]!r}")
        return frozenset(items), None
    raise TypeError(f"ApplyDynamicGroupConv: {option} must be a module path, a list of paths or a predicate "
                    f"fn(path, conv) -> bool, got {type(value).__name__}")


@register_pass
class ApplyDynamicGroupConv(Pass):
    """Replace eligible ``nn.Conv2d`` layers by :class:`DynamicGroupConv2d` (``dynamic_group_conv``).

    Contract: **exact** by default (saliency ≡ 1 via fc2 weight 0 / bias 1, k = 0, head i holds
    rows i::H of the conv's weight). It is **structural** — the function changes by design and
    the pass says so in its contract, its stats (``contract``) and a diagnostic — when

    * ``add_bn_relu=True`` (the authors' behaviour, and the default under ``placement="paper"``):
      convs without a preceding BN→ReLU get a fresh BatchNorm2d + ReLU;
    * ``init="authors"``: the saliency generators start as in the authors' code (fc2
      Kaiming-normal, bias 1), so the saliencies are ReLU(1 + W₂z) — a random function of the
      input with a spread of order one, not ≡ 1. Outputs move by tens of per cent, with no bound
      the pass could state, so this is not an approximation of the original function
      (``approximate`` would promise a small, checked deviation): structural.

    Eligible: plain ``nn.Conv2d`` (not a subclass with its own forward), groups = 1, C_in and C_out
    divisible by ``heads``, zero padding mode, called at one place. A preceding
    ``BatchNorm2d → ReLU`` chain whose nodes feed only the next one is absorbed into the layer
    (``absorb_bn_relu``). Every skipped conv gets a diagnostic saying why; a conv the user named in
    ``include`` that cannot be converted is an error. Convs left static by ``placement="paper"``
    get an info diagnostic and are counted in ``stats["static_by_placement"]``; a conv named in
    ``include`` (by path) is converted whatever the placement.

    Options: ``heads`` (H, default 4), ``ratio`` (ξ ∈ [0, 1), the target pruning rate stored in
    each layer; the schedule reaches it, see :func:`set_progress`), ``squeeze_rate`` (r, halved
    below 80 input channels), ``include`` / ``exclude`` (module paths, or a predicate
    ``fn(path, conv) -> bool``), ``add_bn_relu`` (None: True under ``placement="paper"``, else
    False), ``absorb_bn_relu``, ``placement`` (``"all"`` or ``"paper"``, see the module
    docstring), ``family`` (``"auto"``, ``"densenet"``, ``"resnet"``; read by the paper
    placement), ``init`` (``"exact"`` or ``"authors"``, see :class:`~.module.SaliencyGenerator`).
    """

    name = "dynamic_group_conv"
    contract = Contract.EXACT

    def __init__(self, heads: int = 4, ratio: float = 0.5, squeeze_rate: int = 16, include: Any = None,
                 exclude: Any = None, add_bn_relu: bool | None = None, absorb_bn_relu: bool = True,
                 placement: str = "all", family: str = "auto", init: str = "exact"):
        _check_heads(heads)
        _check_ratio(ratio)
        _check_squeeze(squeeze_rate)
        _check_init(init)
        if placement not in PLACEMENTS:
            raise ValueError(f"ApplyDynamicGroupConv: placement must be one of {', '.join(map(repr, PLACEMENTS))}, "
                             f"got {placement!r}")
        if family not in FAMILIES:
            raise ValueError(f"ApplyDynamicGroupConv: family must be one of {', '.join(map(repr, FAMILIES))}, "
                             f"got {family!r}")
        if add_bn_relu is None:
            add_bn_relu = placement == "paper"
        super().__init__(heads=heads, ratio=ratio, squeeze_rate=squeeze_rate, include=include, exclude=exclude,
                         add_bn_relu=bool(add_bn_relu), absorb_bn_relu=absorb_bn_relu, placement=placement,
                         family=family, init=init)
        self.heads, self.ratio, self.squeeze_rate = heads, float(ratio), squeeze_rate
        self.include_paths, self.include_fn = _as_selector(include, "include")
        self.exclude_paths, self.exclude_fn = _as_selector(exclude, "exclude")
        self.absorb_bn_relu = bool(absorb_bn_relu)
        self.contract_reasons = self._contract_reasons()
        if self.contract_reasons:
            self.contract = Contract.STRUCTURAL

    def _contract_reasons(self) -> list[str]:
        """Why the contract is not exact (empty when it is)."""
        out = []
        if self.add_bn_relu:
            out.append("add_bn_relu=True: convs without a preceding BatchNorm → ReLU get a fresh one")
        if self.init == "authors":
            out.append("init='authors': saliency generators start with fc2 Kaiming-normal and bias 1 (the authors' "
                       "code), so saliencies are not ≡ 1 and the layers do not compute the convs they replace")
        return out

    def _placed(self, gm: fx.GraphModule, node: fx.Node, conv: nn.Conv2d, family: str) -> str | None:
        """None when the placement converts this conv, else why it stays static."""
        if self.placement != "paper" or (self.include_paths is not None and node.target in self.include_paths):
            return None                               # a conv named in include= is converted whatever the placement
        x = first_input(node)
        if x is not None and x.op == "placeholder":
            return "the stem (reads a model input) stays static under placement='paper'"
        if family == "densenet" and tuple(conv.kernel_size) != (1, 1):
            return (f"a {conv.kernel_size[0]}×{conv.kernel_size[1]} conv stays static under placement='paper' "
                    f"(DenseNet family: the paper converts the 1×1 convs only)")
        return None

    def _ineligible(self, gm: fx.GraphModule, node: fx.Node, conv: nn.Module) -> str | None:
        h = self.heads
        if type(conv).forward is not nn.Conv2d.forward:
            return f"is a {type(conv).__name__} (a Conv2d subclass with its own forward); DGC converts plain nn.Conv2d"
        if conv.groups != 1:
            return f"groups={conv.groups} (grouped or depthwise); DGC converts groups=1 convolutions"
        if conv.in_channels % h:
            return f"its {conv.in_channels} input channels are not divisible by heads={h}"
        if conv.out_channels % h:
            return f"its {conv.out_channels} output channels are not divisible by heads={h}"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r}; DGC supports zero padding only"
        if not conv.weight.is_floating_point():
            return f"its weight is {conv.weight.dtype}, not floating point"
        if call_count(gm, node.target) != 1:
            return f"the module is called at {call_count(gm, node.target)} places; DGC needs one call site"
        return None

    def _selected(self, path: str, conv: nn.Module) -> str | None:
        """None when the conv is a candidate, else why not (an info diagnostic)."""
        if self.include_paths is not None and path not in self.include_paths:
            return "not in include"
        if self.include_fn is not None and not self.include_fn(path, conv):
            return "the include predicate rejected it"
        if self.exclude_paths is not None and path in self.exclude_paths:
            return "excluded"
        if self.exclude_fn is not None and self.exclude_fn(path, conv):
            return "the exclude predicate selected it"
        return None

    def _check_include(self, gm: fx.GraphModule) -> None:
        if not self.include_paths:
            return
        called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        modules = dict(gm.named_modules())
        for path in sorted(self.include_paths):
            if path in called and isinstance(modules.get(path), nn.Conv2d):
                continue
            if path not in modules:
                import difflib
                convs = [p for p, m in modules.items() if isinstance(m, nn.Conv2d)]
                close = difflib.get_close_matches(path, convs, n=3)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                raise PassError(self.name, f"include names '{path}', which is not a module of the model.{hint}")
            what = type(modules[path]).__name__
            reason = "is never called in the traced graph" if path not in called else f"is a {what}, not a Conv2d"
            raise PassError(self.name, f"include names '{path}', which {reason}; DGC converts nn.Conv2d layers. "
                                       f"Remove it from include=.")

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        self._check_include(gm)
        diags: list[Diagnostic] = []
        layers: dict[str, dict] = {}
        absorbed = added = static = 0
        family = (detect_family(gm) if self.family == "auto" else self.family) if self.placement == "paper" else None
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            conv = gm.get_submodule(node.target)
            if not isinstance(conv, nn.Conv2d):
                continue
            path = node.target
            why_not = self._selected(path, conv)
            if why_not is not None:
                diags.append(Diagnostic(f"conv {why_not}", path, level="info"))
                continue
            reason = self._ineligible(gm, node, conv)
            if reason is not None:
                if self.include_paths is not None and path in self.include_paths:
                    raise PassError(self.name, f"include names '{path}', which cannot be converted: {reason}. "
                                               f"Remove it from include= or change heads=.")
                diags.append(Diagnostic(f"conv skipped: {reason}", path))
                continue
            static_reason = self._placed(gm, node, conv, family)
            if static_reason is not None:
                diags.append(Diagnostic(static_reason, path, level="info"))
                static += 1
                continue
            norm, source, note = None, node.args[0], None
            if self.absorb_bn_relu:
                match = _ABSORB.match(node, gm)
                if match:
                    bn_node, relu_node = match.nodes[0], match.nodes[1]
                    bn = gm.get_submodule(bn_node.target)
                    if type(bn).forward is not nn.BatchNorm2d.forward:
                        note = f"preceding {type(bn).__name__} not absorbed (custom forward)"
                    elif call_count(gm, bn_node.target) != 1:
                        note = f"preceding BatchNorm '{bn_node.target}' not absorbed (called at several places)"
                    else:
                        norm, source = bn, bn_node.args[0]
                        node.args = (source,) + tuple(node.args[1:])
                        gm.graph.erase_node(relu_node)
                        gm.graph.erase_node(bn_node)
                        note = f"absorbed BatchNorm '{bn_node.target}' → ReLU"
                        absorbed += 1
            pre_relu = norm is not None
            if norm is None and self.add_bn_relu:
                norm = nn.BatchNorm2d(conv.in_channels, device=conv.weight.device, dtype=conv.weight.dtype)
                norm.train(conv.training)
                pre_relu = True
                note = "added BatchNorm2d → ReLU (function changed: add_bn_relu=True)"
                added += 1
            dgc = DynamicGroupConv2d.from_conv(conv, heads=self.heads, ratio=self.ratio,
                                               squeeze_rate=self.squeeze_rate, norm=norm, pre_relu=pre_relu,
                                               init=self.init)
            replace_module(gm, path, dgc)
            layers[path] = {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
                            "kernel_size": tuple(conv.kernel_size), "pre": note or "none"}
        converted = len(layers)
        if converted:
            delete_unused_modules(gm)
            gm.graph.lint()
            gm.recompile()
            graphsel_meta(gm).state[self.name] = {"heads": self.heads, "ratio": self.ratio,
                                                  "squeeze_rate": self.squeeze_rate, "placement": self.placement,
                                                  "family": family, "init": self.init,
                                                  "contract": str(self.contract), "layers": layers}
            for why in self.contract_reasons:
                diags.append(Diagnostic(f"contract {self.contract}: {why}", level="info"))
        else:
            diags.append(Diagnostic("no convolution converted: none is eligible (see the skipped ones)"
                                    if any(d.level == "skip" for d in diags) else
                                    "no convolution converted: the model has no nn.Conv2d selected", level="info"))
        stats = {"converted": converted, "absorbed_bn_relu": absorbed, "added_bn_relu": added,
                 "skipped": sum(d.level == "skip" for d in diags)}
        if self.placement != "all" or self.contract_reasons:
            stats.update(static_by_placement=static, placement=self.placement, family=family, init=self.init,
                         contract=str(self.contract))
        return PassResult(gm, modified=converted > 0, stats=stats, diagnostics=diags)
