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
from .sconv import *  # noqa: F401,F403 - the public names, listed in sconv.__all__
from .sconv import __all__  # noqa: F401
