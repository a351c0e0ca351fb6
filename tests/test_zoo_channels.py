"""Zoo tier of the channel compiler: every torchvision classification model (random init, no
download) is analysed; a random 30 % mask on every prunable group is folded and materialised,
and the slim model matches the mask oracle."""
from __future__ import annotations

import math
import random

import pytest
import torch

import graphsel
from graphsel.channels import analyze_channels
from graphsel.masks import add_group_mask, oracle_forward, removal_positions

tv = pytest.importorskip("torchvision")

MODELS = tv.models.list_models(module=tv.models)
# input sizes: most models accept small images; these need their native size
SIZES = {"vit": 224, "maxvit": 224, "swin": 224, "inception_v3": 299}


def size_of(name: str) -> int:
    return next((v for k, v in SIZES.items() if name.startswith(k)), 64)


def fast_random_model(name: str) -> torch.nn.Module:
    """The model with cheap random weights (initialisers of the big models take minutes)."""
    try:
        with torch.device("meta"):
            m = tv.models.get_model(name)
        m = m.to_empty(device="cpu")
    except Exception:  # noqa: BLE001 - constructors that do not support meta
        return tv.models.get_model(name).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            for pname, p in mod.named_parameters(recurse=False):
                if p.dim() > 1:
                    fan_in = math.prod(p.shape[1:])
                    p.normal_(0, 1 / math.sqrt(fan_in), generator=g)
                else:
                    p.uniform_(-0.5, 0.5, generator=g) if pname != "weight" else p.uniform_(0.5, 1.5, generator=g)
            for bname, b in mod.named_buffers(recurse=False):
                if bname == "running_mean":
                    b.normal_(0, 0.1, generator=g)
                elif bname == "running_var":
                    b.uniform_(0.5, 1.5, generator=g)
                elif b.is_floating_point():
                    b.normal_(0, 0.1, generator=g)
                else:
                    b.zero_()
    return m.eval()


@pytest.mark.zoo
@pytest.mark.parametrize("name", MODELS)
def test_random_masks_materialize_to_the_oracle(name):
    if name.startswith("regnet"):                  # meta init not supported: real init, still fine
        pass
    model = fast_random_model(name)
    x = torch.randn(1, 3, size_of(name), size_of(name))
    gm = graphsel.trace(model, x)
    a = analyze_channels(gm)
    summary = a.summary()
    assert summary["groups"] > 0
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
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 1e-5 + 1e-4 * scale
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
