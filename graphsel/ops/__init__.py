"""``graphsel.ops``: the operator table (see :mod:`graphsel.ops.table`).

One :class:`OpSpec` per operator or family holds, side by side, how channel ids flow through it
(``channels``), what it costs (``cost``, ``category``), how materialize and the oracle slice it
(``params``, ``slice``, ``rewrite``, ``oracle``) and which pattern families it belongs to. The
built-in table lives in this package, one file per family (conv, norm, pointwise, pooling,
reduction, shape, attention). A custom layer is taught with one registration::

    class ChannelScale(nn.Module):                    # y = x · w + b, one weight per channel
        def __init__(self, c):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(c))
            self.bias = nn.Parameter(torch.zeros(c))
        def forward(self, x):
            return x * self.weight[:, None, None] + self.bias[:, None, None]

    graphsel.register_op(ChannelScale, graphsel.OpSpec(
        "channel_scale",
        channels=graphsel.ops.per_channel(),             # acts on each channel on its own
        params=("weight", "bias"),                       # one entry per channel: sliced with it
        slice=graphsel.ops.slice_params("weight", "bias"),
        cost=lambda m, ins, out: {"other_flops": 2 * math.prod(out)}, category="elementwise"))
"""
from graphsel.ops.table import (OpSpec, register_op, registered, spec_of, spec_of_function, spec_of_method,
                                spec_of_module, table_version, unregister_op)
from graphsel.ops.channel import carry_rule, elementwise_rule, per_channel, spatial_rule
from graphsel.ops.slicing import slice_params
from graphsel.ops import attention, conv, norm, pointwise, pooling, reduction, shape  # noqa: F401 - the built-in table

__all__ = ["OpSpec", "register_op", "unregister_op", "spec_of", "spec_of_module", "spec_of_function",
           "spec_of_method", "registered", "table_version", "per_channel", "carry_rule", "elementwise_rule",
           "spatial_rule", "slice_params"]
