"""Pattern matching over traced graphs: spellings, single users, predicates, subclasses, DenseNet."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphsel
from graphsel import Optional, Pattern
from graphsel.analysis.patterns import DROPOUT, RELU, FailedMatch, find_patterns
from strategies import RELU_SPELLINGS, PreActUnit

BN_RELU_CONV = Pattern(nn.BatchNorm2d, RELU, Optional(DROPOUT), nn.Conv2d)


def _trace(model, shape=(2, 4, 6, 6)):
    return graphsel.trace(model.eval(), torch.randn(shape))


def _describe_nodes(gm, match):
    out = []
    for n in match.nodes:
        out.append(type(gm.get_submodule(n.target)).__name__ if n.op == "call_module" else str(n.target))
    return out


@pytest.mark.parametrize("dropout", [None, "module", "functional"])
@pytest.mark.parametrize("spelling", RELU_SPELLINGS)
def test_every_spelling_of_bn_relu_conv_matches(spelling, dropout):
    gm = _trace(PreActUnit(4, 5, 3, 1, spelling, dropout).make())
    matches = BN_RELU_CONV.find(gm)
    assert len(matches) == 1
    m = matches[0]
    assert len(m.nodes) == (4 if dropout else 3)
    assert isinstance(m.module(nn.BatchNorm2d), nn.BatchNorm2d) and isinstance(m.module(nn.Conv2d), nn.Conv2d)
    relu = m.node(RELU)
    assert relu is not None and relu is m.nodes[1]
    assert (m.node(DROPOUT) is not None) == bool(dropout)


class SharedBN(nn.Module):
    """BN output read by the ReLU and by an add: the chain BN→ReLU→Conv has a shared interior node."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.bn(x)
        return self.conv(F.relu(y)) + y


class SharedReLU(nn.Module):
    """ReLU output read by two convolutions."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv_a = nn.Conv2d(4, 4, 1)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.bn(x))
        return self.conv_a(h) + self.conv_b(h)


def test_single_user_violation_is_reported_with_a_reason():
    gm = _trace(SharedBN())
    failures: list = []
    assert BN_RELU_CONV.find(gm, failures) == []
    assert len(failures) == 1
    node, reason = failures[0]
    assert node.target == "conv"
    assert "'bn'" in reason and "feeds 2 nodes" in reason

    gm = _trace(SharedReLU())
    failures = []
    assert BN_RELU_CONV.find(gm, failures) == []
    assert {n.target for n, _ in failures} == {"conv_a", "conv_b"}
    assert all("relu" in r and "feeds 2 nodes" in r for _, r in failures)
    # Without the single-user constraint both convolutions match.
    assert len(Pattern(nn.BatchNorm2d, RELU, nn.Conv2d, single_user=False).find(gm)) == 2


def test_a_non_matching_anchor_or_input_says_why():
    gm = _trace(nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1)))
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "2")
    failed = BN_RELU_CONV.match(conv, gm)
    assert isinstance(failed, FailedMatch) and not failed
    assert "'0'" in failed.reason and "not" in failed.reason
    relu = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
    assert "is not" in BN_RELU_CONV.match(relu, gm).reason


def test_where_predicate_filters_and_explains():
    class TwoConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
            self.dense = nn.Conv2d(4, 4, 3, padding=1)
            self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)

        def forward(self, x):
            return self.grouped(F.relu(self.bn2(self.dense(F.relu(self.bn1(x))))))

    gm = _trace(TwoConvs())
    with_reason = Pattern(nn.BatchNorm2d, RELU, nn.Conv2d,
                          where=lambda m: m.module(nn.Conv2d).groups == 1 or "grouped convolution")
    failures: list = []
    matches = with_reason.find(gm, failures)
    assert [m.root.target for m in matches] == ["dense"]
    assert [(n.target, r) for n, r in failures] == [("grouped", "grouped convolution")]
    boolean = Pattern(nn.BatchNorm2d, RELU, nn.Conv2d, where=lambda m: m.module(nn.Conv2d).groups == 1)
    failures = []
    boolean.find(gm, failures)
    assert "condition" in failures[0][1]


def _count_bn_relu_conv_by_walking_modules(model: nn.Module) -> int:
    """Independent count: consecutive (BatchNorm2d, ReLU, Conv2d) children, in registration order,
    of any module (torchvision registers DenseNet's layers in the order forward calls them)."""
    count = 0
    for m in model.modules():
        kids = list(m.children())
        for a, b, c in zip(kids, kids[1:], kids[2:]):
            count += isinstance(a, nn.BatchNorm2d) and isinstance(b, nn.ReLU) and isinstance(c, nn.Conv2d)
    return count


def test_densenet121_has_all_119_chains_that_subgraph_matcher_misses():
    import torchvision
    from torch.fx.passes.utils.matcher_utils import SubgraphMatcher
    model = torchvision.models.densenet121()
    expected = _count_bn_relu_conv_by_walking_modules(model)
    assert expected == 119  # 58 dense layers × 2 + 3 transitions
    gm = graphsel.trace(model.eval(), torch.randn(1, 3, 32, 32))
    matches = BN_RELU_CONV.find(gm)
    assert len(matches) == expected
    assert len({m.root for m in matches}) == expected
    assert all(type(gm.get_submodule(m.nodes[0].target)) is nn.BatchNorm2d for m in matches)
    # torch.fx's SubgraphMatcher compares module targets by name and finds none.
    pattern = fx.symbolic_trace(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))).graph
    matcher = SubgraphMatcher(pattern, match_output=False, match_placeholder=False)
    assert len(matcher.match(gm.graph)) == 0


def test_timm_batchnormact_matches_batchnorm2d_by_isinstance():
    timm_layers = pytest.importorskip("timm.layers")
    BatchNormAct2d = timm_layers.BatchNormAct2d

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0 = nn.Conv2d(3, 8, 3)
            self.bn = BatchNormAct2d(8, act_layer=nn.ReLU)
            self.conv1 = nn.Conv2d(8, 8, 3)

        def forward(self, x):
            return self.conv1(self.bn(self.conv0(x)))

    gm = graphsel.trace(Net().eval(), torch.randn(1, 3, 10, 10), leaf_modules=[BatchNormAct2d])
    bn_node = next(n for n in gm.graph.nodes if n.target == "bn")
    assert type(gm.get_submodule("bn")) is not nn.BatchNorm2d  # an exact-type matcher would miss it
    assert Pattern(nn.Conv2d, nn.BatchNorm2d).find(gm)[0].nodes[1] is bn_node
    assert Pattern(nn.BatchNorm2d, nn.Conv2d).find(gm)[0].root.target == "conv1"
    # fuse_bn's conv → BN pattern sees it too (the subclass also applies its activation, so
    # whether to fold is the pass's call; here it only has to be found).
    assert [m.nodes[0].target for m in Pattern(nn.Conv2d, "batch_norm").find(gm)] == ["conv0"]
    # fuse_bn must not fold it: its forward also applies the activation.
    model = Net().eval()
    out = graphsel.transform(model, ["fuse_bn"], torch.randn(1, 3, 10, 10), leaf_modules=[BatchNormAct2d])
    record = graphsel.graphsel_meta(out).history[-1]
    assert record.stats["fused"] == 0 and not record.modified
    assert any("BatchNormAct2d overrides" in d.message and d.where == "bn" for d in record.diagnostics)


def test_find_patterns_prefers_longer_patterns_without_overlap():
    gm = _trace(PreActUnit(4, 4, 3, 1, "module", "module").make())
    short = Pattern(RELU, Optional(DROPOUT), nn.Conv2d, name="short")
    matches = find_patterns(gm, [short, BN_RELU_CONV])
    assert len(matches) == 1 and len(matches[0].nodes) == 4


@pytest.mark.parametrize("elements, error", [((), ValueError), ((nn.Conv2d, Optional(RELU)), ValueError),
                                             (("no_such_family",), ValueError), ((3,), TypeError)])
def test_invalid_patterns_are_rejected(elements, error):
    with pytest.raises(error):
        Pattern(*elements)


def test_patterns_are_data_with_readable_names():
    assert repr(BN_RELU_CONV) == "Pattern(BatchNorm2d → relu → [dropout] → Conv2d)"
    alt = Pattern((nn.Conv2d, nn.Linear), "batch_norm")
    assert "Conv2d|Linear" in alt.name
