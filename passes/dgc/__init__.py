"""Dynamic group convolution (DGC; paper 002, ``methods.md`` §2), split by job:

* :mod:`.module` — :class:`DynamicGroupConv2d` (the computation, the masked training path) and
  its :class:`SaliencyGenerator`; :mod:`.fast` — the eval-mode fast path; :mod:`.ranking` — the
  channel ranking and its ``torch.export`` form;
* :mod:`.schedule` — the k schedule (:func:`set_progress`);
* :mod:`.threshold` — global-threshold gating (:class:`SaliencyLibrary`,
  :func:`calibrate_global_threshold`);
* :mod:`.losses` — saliency lasso and angle enlargement;
* :mod:`.training` — the per-iteration training driver (:class:`DGCTraining`) and the
  evaluation-threshold policy (:class:`EvalThreshold`);
* :mod:`.ablation` — random gating (:func:`use_random_gating`), the learned-saliency ablation;
* :mod:`.cost` — the cost rule and tables;
* :mod:`.insert` — the pass :class:`ApplyDynamicGroupConv` (``dynamic_group_conv``).

The public API is re-exported by ``graphsel.passes.dynamic_group_conv``.
"""
from .module import SALIENCY_INITS, SMALL_INPUT, DynamicGroupConv2d, SaliencyGenerator, dgc_modules, squeeze_width
from .schedule import FINETUNE_START, WARMUP_END, schedule_k, schedule_ratio, set_progress
from .threshold import SaliencyLibrary, calibrate_global_threshold, pruning_rates, use_global_threshold
from .losses import angle_enlargement, angle_of, lasso_of, saliency_lasso
from .cost import dgc_cost_rows, dgc_cost_table, dgc_layer_cost, dgc_macs
from .training import EVAL_THRESHOLD_POLICIES, DGCTraining, EvalThreshold, ThresholdUpdate
from .ablation import RandomSaliency, use_random_gating
from .insert import FAMILIES, PLACEMENTS, ApplyDynamicGroupConv, detect_family

__all__ = [
    "DynamicGroupConv2d", "SaliencyGenerator", "ApplyDynamicGroupConv", "squeeze_width", "schedule_k",
    "schedule_ratio", "set_progress", "dgc_modules", "SaliencyLibrary", "calibrate_global_threshold",
    "use_global_threshold", "saliency_lasso", "angle_enlargement", "lasso_of", "angle_of", "pruning_rates",
    "dgc_macs", "dgc_layer_cost", "dgc_cost_rows", "dgc_cost_table", "WARMUP_END", "FINETUNE_START",
    "SMALL_INPUT", "DGCTraining", "EvalThreshold", "ThresholdUpdate", "EVAL_THRESHOLD_POLICIES", "RandomSaliency",
    "use_random_gating", "detect_family", "PLACEMENTS", "FAMILIES", "SALIENCY_INITS",
]
