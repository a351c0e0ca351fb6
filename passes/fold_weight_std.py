"""FoldWeightStd (``fold_weight_std``): turn weight-standardised convolutions into plain ones.

Contract: exact. A weight-standardised conv (timm's ``StdConv2d`` / ``ScaledStdConv2d``, used by
BiT ResNet-V2 and the NFNets) standardises each filter on every forward; for deployment the
standardised weight of a trained model is a constant, so the layer becomes an ``nn.Conv2d``
holding it — as ``fuse_bn`` folds BatchNorm. Layers with TensorFlow-style dynamic SAME padding are
skipped (reported): a plain conv cannot pad by input size.
"""
from __future__ import annotations

import torch.fx as fx

from graphsel.ir.graph import replace_module
from graphsel.ops.conv import as_plain_conv
from graphsel.ops.table import spec_of_module
from graphsel.pipeline.passbase import Contract, Diagnostic, Pass, PassResult
from graphsel.pipeline.registry import register_pass


@register_pass
class FoldWeightStd(Pass):
    """Weight-standardised convs become plain convs with their standardised weight (contract: exact)."""

    name = "fold_weight_std"
    contract = Contract.EXACT

    def run(self, gm: fx.GraphModule, ctx) -> PassResult:
        diags: list[Diagnostic] = []
        folded = 0
        for n in gm.graph.nodes:
            if n.op != "call_module":
                continue
            m = gm.get_submodule(n.target)
            spec = spec_of_module(m)
            if spec is None or spec.name != "weight_standardized_conv":
                continue
            if getattr(m, "same_pad", False):
                diags.append(Diagnostic("dynamic SAME padding: a plain conv cannot pad by input size", n.target))
                continue
            replace_module(gm, n.target, as_plain_conv(m))
            folded += 1
        if not folded:
            diags.append(Diagnostic("no weight-standardised convolution to fold", level="info"))
        return PassResult(gm, modified=folded > 0, stats={"folded": folded}, diagnostics=diags)
