"""Training a DGC model: the per-iteration driver (k schedule, saliency losses, global-threshold
updates) and the threshold policy for evaluation.

    trainer = DGCTraining(gm, total_steps, gating="global")       # or gating="head" (the default)
    for step, (x, y) in enumerate(batches):
        trainer.before_step(step)                 # k and the scheduled ξ at this progress
        loss = F.cross_entropy(gm(x), y) + trainer.regularizer()   # lasso (+ angle enlargement, global)
        ...                                       # backward, optimizer step
        trainer.after_step(step)                  # global: re-fit T from the saliency library when due
    report = trainer.finish()                     # evaluation threshold: the last training calibration
    report = trainer.finish("recalibrate", data=batches)    # named option: T re-fitted after training

**Evaluation threshold** (global gating). The paper updates T during training from the saliency
library and, "like the BN layer, adopt[s] the finally updated T for inference". That is the default
policy, ``"last_training"``: the T of the last calibration during training is kept, and the pruning
rate measured on test data says how well it generalises. ``"recalibrate"`` re-fits T at ξ on given
data after training (eval mode, refined with T in effect, :func:`calibrate_global_threshold`); the
rate then meets ξ on that data by construction and on similar data nearly so, which is why it is a
named option and :class:`EvalThreshold` reports which policy set T. Head-wise gating keeps exactly
C_in − k channels per head whatever the data: no threshold, no policy.

**torch.distributed** (torchrun, DistributedDataParallel around the model): nothing changes in
the loop. ``process_group`` (default: the default group when initialised) makes every
calibration of T use the saliencies of every rank (:mod:`.threshold`), so all ranks set the same
T at the same steps; the k schedule depends only on ``step / total_steps``, and the ranks are
checked once to agree on ``total_steps``, ``gating``, ``threshold_updates`` and ``window``.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from graphsel import distributed as gd

from .losses import angle_enlargement, saliency_lasso
from .module import _require_dgc
from .schedule import set_progress
from .threshold import SaliencyLibrary, _default_ratio, calibrate_global_threshold, use_global_threshold

GATINGS = ("head", "global")
EVAL_THRESHOLD_POLICIES = ("last_training", "recalibrate")


@dataclass
class ThresholdUpdate:
    """One calibration of T during training: after ``step`` iterations, at the scheduled ``ratio``."""
    step: int
    threshold: float
    ratio: float


@dataclass
class EvalThreshold:
    """Which threshold the model evaluates with, and where it came from.

    ``policy``: ``"last_training"``, ``"recalibrate"`` or ``"none"`` (head-wise gating);
    ``threshold``: T in effect (None for head-wise); ``training_threshold``: T of the last training
    calibration (None when there was none); ``updates``: calibrations during training;
    ``last_update_step`` / ``last_update_ratio``: when and at which scheduled ξ the last one ran;
    ``recalibration_batches``: batches used by ``"recalibrate"``."""
    policy: str
    gating: str
    threshold: float | None = None
    training_threshold: float | None = None
    updates: int = 0
    last_update_step: int | None = None
    last_update_ratio: float | None = None
    recalibration_batches: int | None = None
    history: list[ThresholdUpdate] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class DGCTraining:
    """Drives one DGC training run (see the module docstring).

    ``total_steps``: training iterations (the schedule's progress is ``step / total_steps``).
    ``gating``: ``"head"`` (the paper's head-wise threshold, k from :func:`set_progress`) or
    ``"global"`` (global threshold: signed saliencies, as the paper's supplement, T re-fitted
    ``threshold_updates`` times over training from the last ``window`` iterations' saliencies —
    every ``max(window, total_steps // threshold_updates)`` iterations — at the scheduled ξ).
    ``lasso``: λ_s of the saliency lasso (1e-5); ``angle``: λ_a of the angle enlargement (default
    1e-4 with the global threshold, 0 head-wise, as the paper uses it). ``process_group``: see the
    module docstring.
    """

    def __init__(self, model: nn.Module, total_steps: int, *, gating: str = "head", threshold_updates: int = 25,
                 window: int = 10, lasso: float = 1e-5, angle: float | None = None, signed: bool = True,
                 process_group=None):
        if gating not in GATINGS:
            raise ValueError(f"DGCTraining: gating must be one of {', '.join(map(repr, GATINGS))}, got {gating!r}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"DGCTraining: total_steps must be a positive int, got {total_steps!r}")
        if isinstance(threshold_updates, bool) or not isinstance(threshold_updates, int) or threshold_updates < 1:
            raise ValueError(f"DGCTraining: threshold_updates must be a positive int, got {threshold_updates!r}")
        self.modules = _require_dgc(model, "DGCTraining")
        self.process_group = gd.resolve_group(process_group)
        # calibrations are collectives: every rank must run them at the same steps
        gd.same_on_all_ranks((total_steps, gating, threshold_updates, window), self.process_group,
                             what="DGCTraining", name="(total_steps, gating, threshold_updates, window)",
                             fix="give every rank the same number of training steps (a DistributedSampler with "
                                 "drop_last=True gives every rank the same number of batches) and the same options")
        self.model, self.total_steps, self.gating = model, total_steps, gating
        self.lasso = float(lasso)
        self.angle = float(angle) if angle is not None else (1e-4 if gating == "global" else 0.0)
        self.signed = signed
        self.update_every = max(window, total_steps // threshold_updates)
        self.history: list[ThresholdUpdate] = []
        self.library: SaliencyLibrary | None = None
        if gating == "global":
            use_global_threshold(model, signed=signed, threshold=0.0)
            self.library = SaliencyLibrary(model, window=window)

    def before_step(self, step: int) -> None:
        """Apply the schedule at progress ``step / total_steps`` (call before the forward)."""
        set_progress(self.model, step / self.total_steps)

    def regularizer(self) -> torch.Tensor:
        """λ_s · saliency lasso (+ λ_a · angle enlargement) of the last forward."""
        loss = saliency_lasso(self.model, self.lasso)
        if self.angle:
            loss = loss + angle_enlargement(self.model, self.angle)
        return loss

    def after_step(self, step: int) -> ThresholdUpdate | None:
        """After iteration ``step`` (0-based): with the global threshold, re-fit T from the saliency
        library every ``update_every`` iterations (not after the last one)."""
        done = step + 1
        if self.library is None or done % self.update_every or done >= self.total_steps:
            return None
        ratio = _default_ratio(self.modules)           # the scheduled ξ that calibration uses
        t = calibrate_global_threshold(self.model, library=self.library, signed=self.signed,
                                       process_group=self.process_group)
        self.library.clear()
        update = ThresholdUpdate(done, t, ratio)
        self.history.append(update)
        return update

    def close(self) -> None:
        if self.library is not None:
            self.library.close()

    def finish(self, policy: str = "last_training", *, data: Any = None, ratio: float | None = None,
               max_batches: int | None = None, refine: int = 3) -> EvalThreshold:
        """End training: the schedule at its final rate (k = round(C_in·ξ)), the library closed, and the
        evaluation threshold chosen by ``policy`` (see the module docstring). ``"recalibrate"`` needs
        ``data`` (an iterable of batches; ``max_batches``, ``refine`` and ``ratio`` — default ξ — go to
        :func:`calibrate_global_threshold`). Returns an :class:`EvalThreshold` for the results."""
        if policy not in EVAL_THRESHOLD_POLICIES:
            raise ValueError(f"DGCTraining.finish: policy must be one of {', '.join(map(repr, EVAL_THRESHOLD_POLICIES))}, "
                             f"got {policy!r}")
        self.close()
        set_progress(self.model, 1.0)
        last = self.history[-1] if self.history else None
        report = EvalThreshold(policy="none" if self.gating == "head" else policy, gating=self.gating,
                               training_threshold=last.threshold if last else None, updates=len(self.history),
                               last_update_step=last.step if last else None,
                               last_update_ratio=last.ratio if last else None, history=list(self.history))
        if self.gating == "head":
            return report
        if policy == "last_training":
            if last is None:
                raise RuntimeError(f"DGCTraining.finish: no global-threshold calibration ran during training "
                                   f"({self.total_steps} steps, one every {self.update_every}); train longer, "
                                   f"raise threshold_updates, or use policy='recalibrate' with data")
            report.threshold = last.threshold          # still in every layer: nothing changed it since
            return report
        if data is None:
            raise ValueError("DGCTraining.finish: policy='recalibrate' needs data=<iterable of batches>")
        if isinstance(data, torch.Tensor):
            data = [data]
        batches = list(data if max_batches is None else itertools.islice(data, max_batches))
        report.threshold = calibrate_global_threshold(self.model, batches, ratio=ratio, refine=refine,
                                                      signed=self.signed, process_group=self.process_group)
        report.recalibration_batches = len(batches)
        return report
