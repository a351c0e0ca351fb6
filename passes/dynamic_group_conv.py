"""Dynamic group convolution (DGC; paper 002, ``methods.md`` §2) as a graphsel pass.

The implementation is the subpackage :mod:`graphsel.passes.dgc` (the computation and the fast
path in ``dgc/module.py`` and ``dgc/fast.py``); this module is its public face, a path users import.

Public API (``graphsel.passes.dynamic_group_conv``):

* :class:`DynamicGroupConv2d` — the module (a registered tracing leaf). ``set_k(k)``,
  ``set_threshold(T)``, ``set_gating("head" | "global", signed=...)``; every piece of state is a
  buffer saved by ``state_dict()``.
* :class:`ApplyDynamicGroupConv` — the pass (registry name ``dynamic_group_conv``; options
  ``placement="all" | "paper"``, ``init="exact" | "authors"``, ...), :func:`detect_family`.
* Training: :func:`schedule_k`, :func:`schedule_ratio`, :func:`set_progress`,
  :class:`SaliencyLibrary`, :func:`calibrate_global_threshold`, :func:`use_global_threshold`,
  :func:`saliency_lasso`, :func:`angle_enlargement` (and the tensor-level :func:`lasso_of`,
  :func:`angle_of`), :func:`pruning_rates`; :class:`DGCTraining` (the per-iteration driver) and
  :class:`EvalThreshold` (which threshold evaluation uses: ``"last_training"`` or ``"recalibrate"``).
* Ablation: :func:`use_random_gating`, :class:`RandomSaliency`.
* Cost: :func:`dgc_macs` (registered with ``graphsel.analysis.cost.register_module_cost``),
  :func:`dgc_layer_cost`, :func:`dgc_cost_rows`, :func:`dgc_cost_table`.
"""
# `torch` and `F` stay attributes of this module: tests patch torch.matmul and F.conv2d through them
import torch  # noqa: F401
import torch.nn.functional as F  # noqa: F401

from .dgc import (EVAL_THRESHOLD_POLICIES, SALIENCY_INITS, ApplyDynamicGroupConv, DGCTraining, DynamicGroupConv2d, EvalThreshold,
                  RandomSaliency, SaliencyGenerator, SaliencyLibrary, ThresholdUpdate, angle_enlargement, angle_of,
                  calibrate_global_threshold, detect_family, dgc_cost_rows, dgc_cost_table, dgc_layer_cost, dgc_macs,
                  dgc_modules, lasso_of, pruning_rates, saliency_lasso, schedule_k, schedule_ratio, set_progress,
                  squeeze_width, use_global_threshold, use_random_gating)
from .dgc import FINETUNE_START, SMALL_INPUT, WARMUP_END  # noqa: F401 - module constants, as before (not in __all__)

__all__ = [
    "DynamicGroupConv2d", "SaliencyGenerator", "ApplyDynamicGroupConv", "squeeze_width", "schedule_k",
    "schedule_ratio", "set_progress", "dgc_modules", "SaliencyLibrary", "calibrate_global_threshold",
    "use_global_threshold", "saliency_lasso", "angle_enlargement", "lasso_of", "angle_of", "pruning_rates",
    "dgc_macs", "dgc_layer_cost", "dgc_cost_rows", "dgc_cost_table", "DGCTraining", "EvalThreshold",
    "ThresholdUpdate", "EVAL_THRESHOLD_POLICIES", "use_random_gating", "RandomSaliency", "detect_family",
    "SALIENCY_INITS",
]
