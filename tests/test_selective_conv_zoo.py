"""Selective convolution on the torchvision classification zoo (random weights, no downloads).

For every model: the pattern is searched on the ``meta`` device (no memory or initialisation time);
a model without it must be a reported no-op. A model with it is built for real (random BatchNorm
statistics, so no BN is an identity) and must give an exact insertion, then survive
dealloc → realloc → lowering with the lowering verified against the mask oracle. The counts per
model are written by ``benchmarks/sconv_zoo.py``.
"""
from __future__ import annotations

import copy

import pytest
import torch

import graphsel
from graphsel.analysis.cost import meta_model
from graphsel.passes.selective_conv import SelectiveConv2d, dealloc, realloc, selective_modules
from graphsel.analysis.masks import get_masks
from strategies import assert_same_function, randomize_norm_layers

torchvision = pytest.importorskip("torchvision")

ZOO = torchvision.models.list_models(module=torchvision.models)
# Families the method papers apply selective convolution to: they must have the pattern.
EXPECTED_FAMILIES = ("densenet", "resnet", "resnext", "wide_resnet")


def input_size(name: str) -> int:
    if name.startswith(("vit_", "maxvit", "swin")):
        return 224  # fixed-size position embeddings / window partitions
    if name.startswith("inception"):
        return 80
    return 64


def build_kwargs(name: str) -> dict:
    if name in ("googlenet", "inception_v3"):
        return {"init_weights": False}  # scipy truncated-normal init is slow; random weights either way
    return {}


@pytest.mark.zoo
@pytest.mark.parametrize("name", ZOO)
def test_zoo_insertion_exact_and_dealloc_lowering_round_trip(name):
    s = input_size(name)
    meta = meta_model(torchvision.models.get_model, name, **build_kwargs(name)).eval()
    found = graphsel.transform(meta, ["insert_selective_conv"], torch.empty(1, 3, s, s, device="meta"), verify=False)
    n = len(selective_modules(found))
    record = graphsel.graphsel_meta(found).history[-1]
    if name.startswith(EXPECTED_FAMILIES):
        assert n > 0, f"{name}: no BatchNorm2d → ReLU → Conv2d chain found"
    if n == 0:
        assert not record.modified and any("no-op" in d.message for d in record.diagnostics)
        return
    torch.manual_seed(0)
    model = randomize_norm_layers(torchvision.models.get_model(name, **build_kwargs(name))).eval()
    x = torch.randn(1, 3, s, s)
    gm = graphsel.transform(model, ["insert_selective_conv"], x, n_random_inputs=1)  # verified: exact
    assert len(selective_modules(gm)) == n
    assert_same_function(model, gm, x)                                          # and checked here
    closed = dealloc(gm, gamma=0.05)
    assert any(r.closed for r in closed.values())
    realloc(gm, generator=torch.Generator().manual_seed(0))
    low = graphsel.transform(gm, ["lower_selective_conv"], n_random_inputs=0)  # verified: exact
    assert not any(isinstance(m, SelectiveConv2d) for m in low.modules())
    # independently: the lowered graph (masks applied by zeroing the masked columns, which the
    # consumer masks mean) computes what the selective model computes
    masked = copy.deepcopy(low)
    with torch.no_grad():
        for path, positions in get_masks(low).consumer.items():
            masked.get_submodule(path).weight[:, sorted(positions)] = 0
    graphsel.graphsel_meta(masked).masks = None
    assert_same_function(gm, masked, x)
