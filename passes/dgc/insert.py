"""ApplyDynamicGroupConv (``dynamic_group_conv``): replace eligible ``nn.Conv2d`` layers by
:class:`~.module.DynamicGroupConv2d`, absorbing a preceding ``BatchNorm2d → ReLU``."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch.fx as fx
import torch.nn as nn

from graphsel.analysis.patterns import BATCHNORM2D, CONV2D, RELU, Pattern
from graphsel.errors import PassError
from graphsel.ir.graph import call_count, delete_unused_modules, replace_module
from graphsel.ir.meta import graphsel_meta
from graphsel.pipeline.passbase import Contract, Diagnostic, Pass, PassResult
from graphsel.pipeline.registry import register_pass

from .module import DynamicGroupConv2d, _check_heads, _check_ratio, _check_squeeze

_ABSORB = Pattern(BATCHNORM2D, RELU, CONV2D)
Selector = Callable[[str, nn.Conv2d], bool]


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

    Contract: **exact** (saliency ≡ 1 via fc2 weight 0 / bias 1, k = 0, head i holds rows i::H of
    the conv's weight). With ``add_bn_relu=True`` (the authors' behaviour: every DGC layer normalises
    and rectifies its own input) convs without a preceding BN→ReLU get a fresh BatchNorm2d + ReLU,
    which changes the function: the contract is then **structural**.

    Eligible: plain ``nn.Conv2d`` (not a subclass with its own forward), groups = 1, C_in and C_out
    divisible by ``heads``, zero padding mode, called at one place. A preceding
    ``BatchNorm2d → ReLU`` chain whose nodes feed only the next one is absorbed into the layer
    (``absorb_bn_relu``). Every skipped conv gets a diagnostic saying why; a conv the user named in
    ``include`` that cannot be converted is an error.

    Options: ``heads`` (H, default 4), ``ratio`` (ξ ∈ [0, 1), the target pruning rate stored in
    each layer; the schedule reaches it, see :func:`set_progress`), ``squeeze_rate`` (r, halved
    below 80 input channels), ``include`` / ``exclude`` (module paths, or a predicate
    ``fn(path, conv) -> bool``), ``add_bn_relu``, ``absorb_bn_relu``.
    """

    name = "dynamic_group_conv"
    contract = Contract.EXACT

    def __init__(self, heads: int = 4, ratio: float = 0.5, squeeze_rate: int = 16, include: Any = None,
                 exclude: Any = None, add_bn_relu: bool = False, absorb_bn_relu: bool = True):
        _check_heads(heads)
        _check_ratio(ratio)
        _check_squeeze(squeeze_rate)
        super().__init__(heads=heads, ratio=ratio, squeeze_rate=squeeze_rate, include=include, exclude=exclude,
                         add_bn_relu=add_bn_relu, absorb_bn_relu=absorb_bn_relu)
        self.heads, self.ratio, self.squeeze_rate = heads, float(ratio), squeeze_rate
        self.include_paths, self.include_fn = _as_selector(include, "include")
        self.exclude_paths, self.exclude_fn = _as_selector(exclude, "exclude")
        self.add_bn_relu, self.absorb_bn_relu = bool(add_bn_relu), bool(absorb_bn_relu)
        if self.add_bn_relu:
            self.contract = Contract.STRUCTURAL

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
        absorbed = added = 0
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
                                               squeeze_rate=self.squeeze_rate, norm=norm, pre_relu=pre_relu)
            replace_module(gm, path, dgc)
            layers[path] = {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
                            "kernel_size": tuple(conv.kernel_size), "pre": note or "none"}
        converted = len(layers)
        if converted:
            delete_unused_modules(gm)
            gm.graph.lint()
            gm.recompile()
            graphsel_meta(gm).state[self.name] = {"heads": self.heads, "ratio": self.ratio,
                                                  "squeeze_rate": self.squeeze_rate, "layers": layers}
        else:
            diags.append(Diagnostic("no convolution converted: none is eligible (see the skipped ones)"
                                    if any(d.level == "skip" for d in diags) else
                                    "no convolution converted: the model has no nn.Conv2d selected", level="info"))
        stats = {"converted": converted, "absorbed_bn_relu": absorbed, "added_bn_relu": added,
                 "skipped": sum(d.level == "skip" for d in diags)}
        return PassResult(gm, modified=converted > 0, stats=stats, diagnostics=diags)
