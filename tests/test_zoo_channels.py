"""Zoo tier of the channel compiler: every torchvision classification model (random init, no
download) is analysed; a random 30 % mask on every prunable group is folded and materialised;
the requested channels are gone and the slim model matches the mask oracle and — for the 61
convolutional models whose every construct ``tests/zoo_reference.py`` knows — an independent
reference: the original model traced with plain torch.fx and run with the removed channels
forced to zero, no graphsel analysis involved. The oracle itself is checked against it too."""
from __future__ import annotations

import random

import pytest
import torch

import graphsel
from graphsel.analysis.channels import analyze_channels
from graphsel.analysis.masks import add_group_mask, removal_positions
from graphsel.pipeline.oracle import oracle_forward
from graphsel.pipeline.phases import _recorded_shapes
from graphsel.ir.shapes import propagate_shapes
from test_checkpoint import assert_same_model, round_trip, weights_only_torch_load
from test_materialize import assert_requested_removals_happened
from zoo_models import GIANTS, REGULAR, assert_within_tolerance, build, example_input, release_memory
from zoo_reference import zeroed_reference

#: models with constructs the independent reference does not follow: channels-last linears
#: (ConvNeXt, ViT, Swin, MaxViT) and ShuffleNet's shape-driven channel shuffle
NO_REFERENCE = ("convnext_", "shufflenet_", "swin_", "vit_", "maxvit_")


def check_model(name: str) -> None:
    model = build(name)
    x = example_input(name, seed=2)
    gm = graphsel.trace(model, x)
    a = analyze_channels(gm)
    rng = random.Random(0)
    removed = set()
    for g in a.groups:
        if g.prunable:
            k = min(len(g.prunable_classes) - 1, max(1, round(0.3 * len(g.prunable_classes))))
            removed.update(rng.sample(g.prunable_classes, k))
    assert removed, f"{name}: nothing prunable ({a.frozen_report(3)})"
    requested = removal_positions(a, removed)
    for src, pos in requested.items():
        add_group_mask(gm, src, pos)
    with torch.no_grad():
        ref = oracle_forward(gm, (x,))
    slim = graphsel.transform(gm, ["fold_masks", "materialize"], verify=False)
    with torch.no_grad():
        got = slim(x)
    assert_within_tolerance(name, (got.float() - ref.float()).abs().max().item(), ref.float().abs().max().item())
    assert_requested_removals_happened(model, slim, requested, exact=True)
    if not name.startswith(NO_REFERENCE):
        independent = zeroed_reference(model, requested, x).float()
        scale = independent.abs().max().item()
        assert_within_tolerance(name, (got.float() - independent).abs().max().item(), scale)
        assert_within_tolerance(name, (ref.float() - independent).abs().max().item(), scale)
    # materialize recorded the slim graph's shapes without running it (verify=False trusts them)
    recorded = _recorded_shapes(slim)
    propagate_shapes(slim, (x,))
    assert recorded == _recorded_shapes(slim), f"{name}: materialize's recorded shapes differ from the real ones"
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    if name not in GIANTS:   # graphsel.save → load: exact, history and masks kept (giants: memory)
        assert_same_model(slim, round_trip(slim), (x,))
    del gm, slim, model
    release_memory()


@pytest.mark.zoo
@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
@pytest.mark.parametrize("name", REGULAR)
def test_random_masks_materialize_to_the_oracle(name):
    with weights_only_torch_load():      # nothing in this test may unpickle more than data
        check_model(name)
