"""The operator table: teaching graphsel a custom layer with one registration (the README's
example, run as written), and a registered spec whose slicing rule is wrong caught by verification."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import graphsel
from graphsel.ops import table
from strategies import assert_same_function


class ChannelScale(nn.Module):                    # y = x · w + b, one weight per channel
    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def register_channel_scale(slice_rule=None):
    """The README's registration, verbatim (``slice_rule``: a replacement, for the broken spec)."""
    graphsel.register_op(ChannelScale, graphsel.OpSpec(
        "channel_scale",
        channels=graphsel.ops.per_channel(),             # acts on each channel on its own
        params=("weight", "bias"),                       # one entry per channel: sliced with it
        slice=slice_rule or graphsel.ops.slice_params("weight", "bias"),
        cost=lambda m, ins, out: {"other_flops": 2 * math.prod(out)}, category="elementwise"))


class Net(nn.Module):
    def __init__(self, c: int = 8, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.scale = ChannelScale(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Conv2d(c, 4, 1)
        with torch.no_grad():
            self.scale.weight.uniform_(0.5, 2.0)
            self.scale.bias.normal_()

    def forward(self, x):
        y = torch.relu(self.scale(self.stem(x)))
        z = torch.relu(self.conv(y))
        return self.head(z + y if self.residual else z)


X = (torch.randn(2, 3, 8, 8),)


def test_unregistered_layer_is_a_reported_barrier():
    gm = graphsel.trace(Net().eval(), X)
    g = next(g for g in graphsel.analyze_channels(gm).groups if "stem" in g.sources)
    assert not g.prunable
    assert any("cannot slice" in r or "ChannelScale" in r or "scale" in r for r in g.frozen_reasons), g.frozen_reasons


def test_the_readme_registration_makes_the_layer_prunable_counted_and_verified(private_op_table):
    register_channel_scale()
    model = Net().eval()
    gm = graphsel.trace(model, X)
    assert any(n.op == "call_module" and n.target == "scale" for n in gm.graph.nodes)      # one node, a leaf
    assert next(g for g in graphsel.analyze_channels(gm).groups if "stem" in g.sources).prunable
    slim = graphsel.transform(model, [("prune", {"ratio": 0.5}), "fold_masks", "materialize"], X)   # verified
    assert slim.scale.weight.shape[0] == slim.stem.out_channels < 8
    c = graphsel.cost(model, X)
    row = next(r for r in c.rows if r.node == "scale")
    assert row.other_flops == 2 * 2 * 8 * 8 * 8 and not c.unknown


@settings(max_examples=25)
@given(c=st.integers(3, 12), residual=st.booleans(), ratio=st.sampled_from([0.25, 0.5, 0.7]), seed=st.integers(0, 99))
def test_a_registered_layer_prunes_exactly_and_a_wrong_slice_rule_is_caught(c, residual, ratio, seed):
    saved = {name: dict(getattr(table._TABLE, name)) for name in ("modules",)}
    try:
        torch.manual_seed(seed)
        model = Net(c, residual).eval()
        pipeline = [("prune", {"ratio": ratio, "scope": "uniform"}), "fold_masks", "materialize"]
        register_channel_scale()
        pruned = graphsel.transform(model, pipeline[:1], X)
        removed = {src: sorted(pos) for src, pos in graphsel.get_masks(pruned).removed.items()}
        slim = graphsel.transform(pruned, pipeline[1:])
        kept = slim.stem.out_channels
        assert kept == c - len(removed.get("stem", ())) and (kept < c or int(ratio * c) == 0)
        # independent check: the slim model equals the model with the removed channels zeroed
        ref = Net(c, residual).eval()
        ref.load_state_dict(model.state_dict())
        with torch.no_grad():
            for src, pos in removed.items():
                getattr(ref, src).weight[pos] = 0
                getattr(ref, src).bias[pos] = 0
            ref.scale.weight[removed.get("stem", [])] = 0
            ref.scale.bias[removed.get("stem", [])] = 0
        assert_same_function(ref, slim, X)
        if 2 <= kept < c:
            # a slicing rule that puts the kept channels' parameters in the wrong order must not slip through
            register_channel_scale(lambda m, parts: graphsel.ops.slice_params("weight", "bias")(
                m, {"chan": parts["chan"].roll(1)}))
            with pytest.raises(graphsel.FunctionChangedError, match="materialize"):
                graphsel.transform(model, pipeline, X)
    finally:
        table._TABLE.modules.clear()
        table._TABLE.modules.update(saved["modules"])
        table._TABLE.version += 1
        table._TABLE.by_type.clear()


def test_lookup_follows_the_class_hierarchy_and_qualified_names(private_op_table):
    class MyBN(nn.BatchNorm2d):
        pass
    assert graphsel.ops.spec_of_module(MyBN(3)).name == "batch_norm"
    graphsel.register_op(f"{__name__}.ChannelScale", graphsel.OpSpec("by_name", cost=lambda m, i, o: 0))
    assert graphsel.ops.spec_of_module(ChannelScale(2)).name == "by_name"
    graphsel.register_op(ChannelScale, graphsel.OpSpec("by_class"))
    assert graphsel.ops.spec_of_module(ChannelScale(2)).name == "by_class"      # the class itself first


def test_every_module_spec_with_channel_slots_can_be_sliced():
    """A module spec whose channel rule records slots must come with a slice rule (materialize
    would fail otherwise)."""
    for cls, spec in table.registered()["modules"].items():
        if spec.params:
            assert spec.slice is not None, f"{cls.__qualname__} lists params but has no slice rule"
