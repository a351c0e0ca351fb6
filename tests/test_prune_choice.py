"""Prune removes the channels its criterion calls least important — checked against scores
computed here, independently of the pass, on models with planted unimportant channels.

(Without these, a prune that kept the *least* important channels would pass every other test:
they check that what was removed is removed exactly, not that the right channels were chosen.)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import graphsel


class Chain(nn.Module):
    """conv(3→c) → BN → ReLU → conv(c→d) → BN → ReLU → GAP → linear."""

    def __init__(self, c: int, d: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, d, 3, padding=1, bias=False), nn.BatchNorm2d(d)
        self.fc = nn.Linear(d, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


X = (torch.randn(2, 3, 8, 8),)


def removed_by(model: nn.Module, **options) -> dict[str, set[int]]:
    gm = graphsel.transform(model, [("prune", {"scope": "uniform", **options})], X)
    return {k: set(v) for k, v in graphsel.get_masks(gm).removed.items()}


def lowest(scores: np.ndarray, k: int) -> set[int]:
    order = np.lexsort((np.arange(len(scores)), scores))       # ties: lower position first
    return set(order[:k].tolist())


@settings(max_examples=20)
@given(c=st.integers(4, 12), d=st.integers(4, 12), ratio=st.sampled_from([0.25, 0.5, 0.75]), seed=st.integers(0, 999))
def test_l1_removes_the_filters_with_the_smallest_l1_norm(c, d, ratio, seed):
    torch.manual_seed(seed)
    model = Chain(c, d).eval()
    with torch.no_grad():                      # distinct norms: a planted ordering, no ties
        for conv in (model.conv1, model.conv2):
            scale = torch.randperm(conv.out_channels).double() + 1
            conv.weight.mul_((scale / conv.weight.abs().flatten(1).sum(1).double()).view(-1, 1, 1, 1).float())
    got = removed_by(model, ratio=ratio, criterion="l1")
    for name, conv in (("conv1", model.conv1), ("conv2", model.conv2)):
        l1 = conv.weight.detach().abs().flatten(1).sum(1).double().numpy()
        k = int(ratio * conv.out_channels)
        assert got.get(name, set()) == lowest(l1, k), name


@settings(max_examples=20)
@given(c=st.integers(4, 12), d=st.integers(4, 12), ratio=st.sampled_from([0.25, 0.5]), seed=st.integers(0, 999))
def test_bn_gamma_removes_the_channels_with_the_smallest_abs_gamma(c, d, ratio, seed):
    torch.manual_seed(seed)
    model = Chain(c, d).eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.copy_((torch.randperm(bn.num_features).float() + 1) * torch.where(
                torch.rand(bn.num_features) < 0.3, -1.0, 1.0))
            bn.bias.normal_()
    got = removed_by(model, ratio=ratio, criterion="bn_gamma")
    for name, bn in (("conv1", model.bn1), ("conv2", model.bn2)):
        k = int(ratio * bn.num_features)
        assert got.get(name, set()) == lowest(bn.weight.detach().abs().double().numpy(), k), name


@pytest.mark.parametrize("criterion", ["l1", "bn_gamma", "ecdm"])
def test_planted_dead_channels_go_first(criterion):
    """Channels whose filter, γ and outgoing weights are all (nearly) zero are the ones removed,
    whatever the criterion: every criterion ranks them last."""
    torch.manual_seed(0)
    model = Chain(8, 8).eval()
    dead = [1, 4, 6, 7]
    with torch.no_grad():
        model.conv1.weight[dead] *= 1e-3
        model.bn1.weight[dead] = 1e-3
        model.bn1.bias[dead] = -1.0              # ReLU(BN) ≈ 0: no expected activation either
        model.conv2.weight[:, dead] *= 1e-3
    assert removed_by(model, ratio=0.5, criterion=criterion)["conv1"] == set(dead)


def test_global_scope_compares_normalised_scores_across_groups():
    """``scope="global"`` ranks every class by its score over its group's mean: a group whose
    channels are all alike loses none while another has planted weak ones."""
    torch.manual_seed(0)
    model = Chain(8, 8).eval()
    with torch.no_grad():
        model.conv1.weight.copy_(torch.ones_like(model.conv1.weight))        # all alike
        model.conv2.weight.normal_()
        model.conv2.weight[[0, 3]] *= 1e-3                                     # two weak filters
    gm = graphsel.transform(model, [("prune", {"ratio": 2 / 16, "criterion": "l1", "scope": "global"})], X)
    assert {k: set(v) for k, v in graphsel.get_masks(gm).removed.items()} == {"conv2": {0, 3}}
