"""Zoo tier: every torchvision classification model (random init, no download) traces with plain
graphsel.trace (no automatic leafing needed) and fuse_bn preserves its outputs, checked by the
pipeline's verification and independently against the original model.

BatchNorm statistics and affine parameters are randomised (torchvision initialises them to the
identity, which would make folding trivially exact). Inputs are as small as each model allows.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import graphsel
from graphsel import graphsel_meta
from strategies import max_abs_difference
from zoo_models import GIANTS, MODELS, REGULAR, assert_within_tolerance, build, example_input, release_memory


def test_the_zoo_has_all_classification_models():
    assert len(MODELS) == len(set(MODELS)) == 80
    assert sorted(REGULAR + list(GIANTS)) == sorted(MODELS)


def check_model(name: str) -> None:
    """graphsel.trace needs no automatic leafing; fuse_bn keeps the outputs (pipeline + independent check)."""
    with torch.no_grad():
        model = build(name)
        x = example_input(name, seed=2)
        has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())

        out = graphsel.transform(model, ["fuse_bn"], x, n_random_inputs=1)
        meta = graphsel_meta(out)
        assert meta.leafed == [], f"{name} needed automatic leafing: {meta.leafed}"
        row = meta.history[-1]
        assert row.max_abs is not None and row.max_abs <= row.tolerance  # the pipeline's own check
        bn_calls_left = sum(1 for n in out.graph.nodes if n.op == "call_module"
                            and isinstance(out.get_submodule(n.target), nn.BatchNorm2d))
        assert bn_calls_left == row.stats["skipped"]  # every BN still called was reported as skipped
        assert sum(isinstance(m, nn.BatchNorm2d) for m in out.modules()) == bn_calls_left  # no dead BNs kept
        if has_bn:
            assert row.stats["fused"] > 0

        # Independent check on a fresh input: the returned module against the user's model.
        assert_within_tolerance(name, *max_abs_difference(model, out, (example_input(name, seed=3),)))
        del out, model
    release_memory()


@pytest.mark.zoo
@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
@pytest.mark.parametrize("name", REGULAR)
def test_zoo_model_traces_and_fuse_bn_preserves_outputs(name):
    check_model(name)
