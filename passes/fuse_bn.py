"""FuseBatchNorm (``fuse_bn``): fold eval-mode BatchNorm into the preceding convolution or linear layer.

Contract: exact in eval mode (BatchNorm is folded with its running statistics).
Matches ``Conv{1,2,3}d → BatchNorm{1,2,3}d`` and ``Linear → BatchNorm1d`` where the producer's
output feeds only the BatchNorm and the producer module is called once. Skipped, with a
diagnostic: a BatchNorm whose input has other users, whose producer is not a conv/linear (after a
ReLU, a concat, an input), whose producer is called at several places, that keeps no running
statistics, or whose class overrides BatchNorm's forward (timm's BatchNormAct2d). Removes the BatchNorm nodes and their modules.
"""
from __future__ import annotations

import copy

import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from graphsel.analysis.patterns import BATCHNORM, Pattern
from graphsel.ir.graph import call_count, delete_unused_modules, replace_module
from graphsel.pipeline.passbase import Contract, Diagnostic, Pass, PassResult
from graphsel.pipeline.registry import register_pass

_CONV_FOR_BN = {nn.BatchNorm1d: (nn.Conv1d, nn.Linear), nn.BatchNorm2d: (nn.Conv2d,), nn.BatchNorm3d: (nn.Conv3d,)}


def _producer_ok(match) -> bool | str:
    prod, bn = match.modules()
    if type(bn).forward is not nn.modules.batchnorm._BatchNorm.forward:
        return (f"{type(bn).__name__} overrides BatchNorm's forward (e.g. timm's BatchNormAct2d adds an "
                f"activation); folding it would drop that")
    for bn_cls, prods in _CONV_FOR_BN.items():
        if isinstance(bn, bn_cls):
            if isinstance(prod, prods):
                return True
            return f"{type(prod).__name__} cannot absorb {type(bn).__name__}"
    return f"{type(bn).__name__} is not a BatchNorm1d/2d/3d"


@register_pass
class FuseBatchNorm(Pass):
    """Fold eval-mode BatchNorm into the preceding conv/linear (contract: exact). See module docstring."""

    name = "fuse_bn"
    contract = Contract.EXACT

    def __init__(self):
        super().__init__()
        self.pattern = Pattern((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear), BATCHNORM, where=_producer_ok)

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        diags: list[Diagnostic] = []
        fused = 0
        if any(m.training for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            diags.append(Diagnostic("the graph is in training mode: fused layers compute BatchNorm with its "
                                    "running statistics (eval semantics); fuse for deployment only", level="warning"))
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
                continue
            bn = gm.get_submodule(node.target)
            m = self.pattern.match(node, gm)
            if not m:
                diags.append(Diagnostic(m.reason, node.target))
                continue
            prod_node = m.nodes[0]
            prod = gm.get_submodule(prod_node.target)
            if bn.running_mean is None or bn.running_var is None:
                diags.append(Diagnostic("BatchNorm keeps no running statistics (track_running_stats=False)", node.target))
                continue
            if call_count(gm, prod_node.target) != 1:
                diags.append(Diagnostic(f"'{prod_node.target}' is called at {call_count(gm, prod_node.target)} places", node.target))
                continue
            p_eval, b_eval = copy.deepcopy(prod).eval(), copy.deepcopy(bn).eval()
            fused_mod = fuse_linear_bn_eval(p_eval, b_eval) if isinstance(prod, nn.Linear) else fuse_conv_bn_eval(p_eval, b_eval)
            fused_mod.train(prod.training)
            replace_module(gm, prod_node.target, fused_mod)
            node.replace_all_uses_with(prod_node)
            gm.graph.erase_node(node)
            fused += 1
        if fused:
            delete_unused_modules(gm)
            gm.recompile()
        else:
            diags.append(Diagnostic("nothing to fuse: no conv/linear → BatchNorm pair found", level="info"))
        return PassResult(gm, modified=fused > 0, stats={"fused": fused, "skipped": sum(d.level == "skip" for d in diags)},
                          diagnostics=diags)
