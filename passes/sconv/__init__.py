"""Selective convolution (papers 000/001, methods.md §1) as a subpackage, one job per file:
``module`` (SelectiveConv2d), ``shift`` (bilinear shifts), ``ecdm`` (expected channel damage,
dealloc, realloc), ``insert`` / ``lower`` (the passes), ``training`` (schedule, optimizer groups),
``testing`` (random states for tests). ``graphsel.passes.selective_conv`` is its public module."""
from .ecdm import (DeallocReport, ReallocReport, dealloc, dealloc_layer, ecdm, expected_activation,
                         normalized_ecdm, realloc, realloc_layer)
from .insert import PATTERN, InsertSelectiveConv
from .lower import LowerSelectiveConv
from .module import DEFAULT_GAMMA, SelectiveConv2d, check_options, default_K, selective_modules
from .shift import bilinear_shift, shift_kernels
from .testing import randomize_state
from .training import (EpochRecord, LayerAllocation, SelectiveSchedule, allocation, param_groups,
                             reset_optimizer_slots)

__all__ = [
    "SelectiveConv2d", "InsertSelectiveConv", "LowerSelectiveConv", "PATTERN", "ecdm", "normalized_ecdm",
    "expected_activation", "dealloc", "realloc", "dealloc_layer", "realloc_layer", "DeallocReport", "ReallocReport",
    "SelectiveSchedule", "EpochRecord", "LayerAllocation", "allocation", "param_groups", "reset_optimizer_slots",
    "bilinear_shift", "shift_kernels", "randomize_state", "selective_modules", "check_options", "default_K",
    "DEFAULT_GAMMA",
]
