"""Pooling, interpolation and spatial padding: channels on dimension 1 are kept (pooling over
the channel dimension is a barrier); padding the channel dimension is a barrier."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from graphsel.ops import channel as ch
from graphsel.ops.costs import free, interpolate_function, per_input_element, pool_function, pool_module, upsample_module
from graphsel.ops.table import OpSpec, register_op
from graphsel.ops.targets import functions_named

M = nn.modules
_adaptive_module, _adaptive_function = per_input_element(1)

register_op([M.pooling._MaxPoolNd, M.pooling._AvgPoolNd, M.pooling._LPPoolNd],
            OpSpec("pool", ch.spatial_rule, cost=pool_module, category="pool"))
register_op([M.pooling._AdaptiveAvgPoolNd, M.pooling._AdaptiveMaxPoolNd],
            OpSpec("adaptive_pool", ch.spatial_rule, cost=_adaptive_module, category="pool"))
register_op(nn.Upsample, OpSpec("upsample", ch.spatial_rule, cost=upsample_module, category="pool"))
register_op([M.padding._ConstantPadNd, M.padding._ReflectionPadNd, M.padding._ReplicationPadNd]
            + ([M.padding._CircularPadNd] if hasattr(M.padding, "_CircularPadNd") else []),
            OpSpec("pad", ch.spatial_rule, cost=free, category="memory"))

register_op(functions_named("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                            "lp_pool1d", "lp_pool2d"),
            OpSpec("pool", ch.spatial_rule, cost=pool_function, category="pool"))
register_op(functions_named("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                            "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"),
            OpSpec("adaptive_pool", ch.spatial_rule, cost=_adaptive_function, category="reduce"))
register_op(functions_named("max_pool2d_with_indices", "adaptive_max_pool2d_with_indices"),
            OpSpec("pool_with_indices", ch.spatial_rule))
register_op(functions_named("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"),
            OpSpec("interpolate", ch.spatial_rule, cost=interpolate_function, category="pool"))
register_op(F.pad, OpSpec("pad", ch.pad_rule, cost=free, category="memory"))
