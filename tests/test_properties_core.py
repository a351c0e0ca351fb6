"""Properties of the core over random architectures: tracing and fuse_bn preserve the function.

The comparison is independent of the pipeline's own verification: the returned module is run
next to the user's original model on fresh inputs.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from hypothesis import given, settings

import graphsel
from strategies import architectures, assert_same_function


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@settings(max_examples=80)
@given(architectures())
def test_trace_preserves_outputs(arch):
    model = arch.build()
    x = arch.example_inputs()
    gm = graphsel.trace(model, x)
    assert_same_function(model, gm, x)
    assert_same_function(model, gm, arch.example_inputs(seed=arch.seed + 1))


@settings(max_examples=80)
@given(architectures())
def test_fuse_bn_preserves_outputs(arch):
    model = arch.build()
    before = _state(model)
    x = arch.example_inputs()
    out = graphsel.transform(model, ["fuse_bn"], x)
    for inputs in (x, arch.example_inputs(seed=arch.seed + 1)):
        assert_same_function(model, out, inputs)
    # Every BN whose producer is a conv/linear with no other user is gone; the others are reported.
    record = graphsel.graphsel_meta(out).history[-1]
    remaining = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in out.modules())
    total = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert record.stats["fused"] == total - remaining
    assert record.stats["skipped"] == remaining
    if "post_activation" in arch.constructs or "linear_bn1d" in arch.constructs:
        assert record.stats["fused"] >= 1 and record.modified
    # The user's model is untouched.
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@settings(max_examples=30)
@given(architectures())
def test_fuse_bn_on_a_trained_mode_model_returns_train_mode_and_eval_function(arch):
    model = arch.build().train()
    x = arch.example_inputs()
    reference = copy.deepcopy(model).eval()
    out = graphsel.transform(model, ["fuse_bn"], x)
    assert out.training and all(m.training for m in out.modules())
    assert_same_function(reference, out, x)  # compared in eval mode
