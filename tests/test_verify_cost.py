"""What verification costs (forwards counted, never timed) and that its shortcuts keep it honest:
a pass whose graph, tensors and mask-oracle plan are unchanged is not run again, but any change
of values, tensors or plan still runs the forwards and is caught."""
from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn

import graphsel
from graphsel import Contract, FunctionChangedError, Pass, PassResult
from graphsel.analysis.masks import add_group_mask, get_masks
from graphsel.ir.meta import graphsel_meta


class Net(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.bn2(self.conv(x))) + x
        return self.fc(x.mean((2, 3)))


X = (torch.randn(1, 3, 8, 8),)


def _count_stem_calls(monkeypatch):
    """Every forward (plain, oracle, shape propagation) calls the stem conv once: count them by caller."""
    calls = collections.Counter()
    orig = nn.Conv2d._conv_forward

    def counting(self, x, w, b):
        if w.shape[1] == 3:
            calls["all"] += 1
        return orig(self, x, w, b)
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", counting)
    return calls


def test_the_slimming_pipeline_verifies_with_at_most_three_forwards_per_pass(monkeypatch):
    """trace: 1 (shapes); prune: 0 (structural: output shapes); fold_masks: 3 (the masked
    reference on the example and two random inputs; its own output is the same computation);
    materialize: 3 (the shape propagation on the example input is its first)."""
    calls = _count_stem_calls(monkeypatch)
    per_pass = []
    from graphsel.pipeline import phases
    orig = phases.run_pass

    def counting_run_pass(p, *a, **k):
        before = calls["all"]
        out = orig(p, *a, **k)
        per_pass.append((p.name, calls["all"] - before))
        return out
    monkeypatch.setattr(phases, "run_pass", counting_run_pass)
    gm = graphsel.transform(Net(), [("prune", {"ratio": 0.5}), "fold_masks", "materialize"], X, verify=True)
    assert per_pass == [("prune", 0), ("fold_masks", 3), ("materialize", 3)]
    assert calls["all"] == 7
    rows = graphsel_meta(gm).history
    assert [r.verified for r in rows] == [True, True, True]
    assert rows[1].max_abs == 0.0 and rows[2].max_abs is not None


class ZeroOneChannelByMask(Pass):
    """Claims exactness but adds a channel that is read to the removed set (changes the plan)."""
    name = "zero_one_channel"
    contract = Contract.EXACT

    def run(self, gm, ctx):
        add_group_mask(gm, "conv", [0])
        return PassResult(gm, modified=False)


class WritesThroughData(Pass):
    """Claims exactness, leaves the graph alone, scales a weight through ``.data`` (no version bump)."""
    name = "writes_through_data"
    contract = Contract.EXACT

    def run(self, gm, ctx):
        gm.conv.weight.data.mul_(2.0)
        return PassResult(gm, modified=False)


class ReplacesWeight(Pass):
    """Claims exactness, swaps in a new weight tensor of the same shape and other values."""
    name = "replaces_weight"
    contract = Contract.EXACT

    def run(self, gm, ctx):
        gm.conv.weight = nn.Parameter(gm.conv.weight.detach() * 2.0)
        return PassResult(gm, modified=False)


class DoesNothing(Pass):
    name = "does_nothing"
    contract = Contract.EXACT

    def run(self, gm, ctx):
        return PassResult(gm, modified=False)


@pytest.mark.parametrize("bad", [ZeroOneChannelByMask, WritesThroughData, ReplacesWeight])
def test_what_the_shortcut_must_not_hide(bad):
    with pytest.raises(FunctionChangedError, match=bad.name):
        graphsel.transform(Net(), [("prune", {"ratio": 0.25}), "fold_masks", bad()], X, verify=True)


def test_a_pass_that_changes_nothing_costs_no_forward(monkeypatch):
    calls = _count_stem_calls(monkeypatch)
    graphsel.transform(Net(), [("prune", {"ratio": 0.25}), "fold_masks", DoesNothing(), DoesNothing()], X,
                       verify=True)
    assert calls["all"] == 1 + 3                # trace + fold_masks' reference; nothing after


def test_changed_masks_with_the_same_plan_are_the_same_computation():
    """fold_masks rewrites the masks in canonical form; the plan they give the oracle is the same."""
    gm = graphsel.transform(Net(), [("prune", {"ratio": 0.25}), "fold_masks"], X, verify=True)
    assert get_masks(gm).count()[0] > 0
    assert graphsel_meta(gm).history[-1].max_abs == 0.0


def test_non_finite_weights_are_still_refused():
    net = Net()
    with torch.no_grad():
        net.conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(graphsel.GraphselError, match="conv.weight.*NaN or infinite"):
        graphsel.transform(net, ["fold_masks"], X, verify=True)
    with torch.no_grad():
        net.conv.weight[0, 0, 0, 0] = float("-inf")
    with pytest.raises(graphsel.GraphselError, match="conv.weight"):
        graphsel.transform(net, ["fold_masks"], X, verify=True)
