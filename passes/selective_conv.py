"""Selective convolution (papers 000/001, methods.md §1): convolutions that choose their input channels.

* :class:`SelectiveConv2d` — the trainable module (slots with ``is_open``, ``source``, ``shift``);
* :class:`InsertSelectiveConv` (``insert_selective_conv``, exact) — puts one on every
  ``BatchNorm2d → ReLU → [Dropout] → Conv2d`` chain;
* :func:`ecdm`, :func:`dealloc`, :func:`realloc` — expected channel damage and the re-wiring operations;
* :class:`SelectiveSchedule`, :func:`param_groups` — training integration;
* :class:`LowerSelectiveConv` (``lower_selective_conv``, exact) — static export to plain ops plus
  consumer masks, followed by ``fold_masks`` and ``materialize``.

Typical use::

    gm = graphsel.transform(model, ["insert_selective_conv"], example_inputs=x)
    opt = torch.optim.SGD(param_groups(gm), lr=0.1, momentum=0.9, nesterov=True)
    schedule = SelectiveSchedule(gm, epochs, optimizer=opt)
    ...  # train, calling schedule.on_epoch_end(epoch) after each epoch
    slim = graphsel.transform(gm, ["lower_selective_conv", "fold_masks", "materialize"])
"""
from .sconv.ecdm import (DeallocReport, ReallocReport, dealloc, dealloc_layer, ecdm, expected_activation,
                         normalized_ecdm, realloc, realloc_layer)
from .sconv.insert import PATTERN, InsertSelectiveConv
from .sconv.lower import LowerSelectiveConv
from .sconv import demo as _demo  # noqa: F401 - registers the `graphsel demo` section
from .sconv.module import DEFAULT_GAMMA, SelectiveConv2d, check_options, default_K, selective_modules
from .sconv.shift import bilinear_shift, shift_kernels
from .sconv.testing import randomize_state
from .sconv.training import (EpochRecord, LayerAllocation, SelectiveSchedule, allocation, param_groups,
                             reset_optimizer_slots)

__all__ = [
    "SelectiveConv2d", "InsertSelectiveConv", "LowerSelectiveConv", "PATTERN", "ecdm", "normalized_ecdm",
    "expected_activation", "dealloc", "realloc", "dealloc_layer", "realloc_layer", "DeallocReport", "ReallocReport",
    "SelectiveSchedule", "EpochRecord", "LayerAllocation", "allocation", "param_groups", "reset_optimizer_slots",
    "bilinear_shift", "shift_kernels", "randomize_state", "selective_modules", "check_options", "default_K",
    "DEFAULT_GAMMA",
]
