"""Zoo tier of the channel compiler: every torchvision classification model (random init, no
download) is analysed; a random 30 % mask on every prunable group is folded and materialised,
and the slim model matches the mask oracle."""
from __future__ import annotations

import random

import pytest
import torch

import graphsel
from graphsel.channels import analyze_channels
from graphsel.masks import add_group_mask, oracle_forward, removal_positions
from zoo_models import BFLOAT16, INPUT_SIZE, REGULAR, build, release_memory


def check_model(name: str) -> None:
    model = build(name)
    dtype = torch.bfloat16 if name in BFLOAT16 else torch.float32
    size = INPUT_SIZE.get(name, 32)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2)).to(dtype)
    gm = graphsel.trace(model, x)
    a = analyze_channels(gm)
    rng = random.Random(0)
    removed = set()
    for g in a.groups:
        if g.prunable:
            k = min(len(g.prunable_classes) - 1, max(1, round(0.3 * len(g.prunable_classes))))
            removed.update(rng.sample(g.prunable_classes, k))
    assert removed, f"{name}: nothing prunable ({a.frozen_report(3)})"
    for src, pos in removal_positions(a, removed).items():
        add_group_mask(gm, src, pos)
    with torch.no_grad():
        ref = oracle_forward(gm, (x,))
    slim = graphsel.transform(gm, ["fold_masks", "materialize"], verify=False)
    with torch.no_grad():
        got = slim(x)
    rtol, atol = graphsel.verify.tolerance_for(dtype)
    scale = ref.float().abs().max().item()
    err = (got.float() - ref.float()).abs().max().item()
    assert scale > 0 and err <= atol + rtol * scale, f"{name}: max abs error {err:.3g} at scale {scale:.3g}"
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    del gm, slim, model
    release_memory()


@pytest.mark.zoo
@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
@pytest.mark.parametrize("name", REGULAR)
def test_random_masks_materialize_to_the_oracle(name):
    check_model(name)
