"""Discrimination-aware channel pruning (passes/dcp; methods.md §3, paper 003).

Properties (Hypothesis): auxiliary-classifier insertion is exact — bit for bit — on random residual
architectures, with the blocks found on the graph equal to the blocks the architecture was built
from and the pivots at the authors' positions; DCP followed by fold_masks → materialize equals the
masked model (pipeline-verified, and against the plain forward of DCP's output, whose unselected
columns are exactly zero). A planted problem: small-weight informative channels are kept by DCP
and dropped by L1. Table S5's counts on the pre-activation ResNet-56. Phase 1 resumes exactly.
DCP-Adapt stops by itself. Bad input gets a DCPError naming the fix; the user's model is never
modified.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphsel
from graphsel.passes import dcp
from graphsel.passes.dcp import DCPError
from graphsel.tools.models import preact_resnet_cifar
import strategies as S
from strategies import architectures, assert_model_unchanged, model_snapshot

RESIDUAL_KINDS = ("residual", "conv", "preact", "pool", "se", "dense", "dropout")


def labelled(shape, classes: int, batches: int = 1, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g))
            for _ in range(batches)]


def n_residual(arch) -> int:
    return sum(isinstance(b, S.ResidualBlock) or (isinstance(b, S.ConvNeXtBlock) and b.residual) for b in arch.blocks)


# ------------------------------------------------------------------------------------------------
# pivots and auxiliary classifiers

def test_pivot_positions_follow_the_authors_cal_pivot():
    assert dcp.pivot_blocks(27, 3) == [6, 13, 20]          # ResNet-56: after blocks 7, 14, 21
    assert dcp.pivot_blocks(8, 2) == [2, 5]                 # ResNet-18: after blocks 3, 6
    assert dcp.pivot_blocks(3, 3) == [0, 1]                 # clamped to B − 1, no repeats
    assert dcp.pivot_blocks(1, 2) == [] and dcp.pivot_blocks(9, 0) == []


@settings(max_examples=20, suppress_health_check=[HealthCheck.large_base_example])
@given(arch=architectures(RESIDUAL_KINDS, required=("residual", "residual"), head=True, min_blocks=2, max_blocks=5),
       heads=st.sampled_from([1, 2, 3, "auto"]))
def test_auxiliary_heads_are_exact_side_outputs(arch, heads):
    model = arch.build()
    x = arch.example_inputs()
    plain = graphsel.trace(model, x)
    structure = dcp.find_structure(plain, graphsel.analyze_channels(plain))
    assert len(structure.blocks) == n_residual(arch)        # found on the graph, not by names
    gm = graphsel.transform(model, [("dcp_heads", {"heads": heads})], x)     # verified: exact
    with torch.no_grad():
        reference = plain(*x)
        assert torch.equal(gm(*x), reference)                # bit for bit
        main, aux = dcp.aux_model(gm)(*x)
    hs = dcp.heads_of(gm)
    assert [h["block"] for h in hs] == structure.pivots(heads)
    assert torch.equal(main, reference) and len(aux) == len(hs)
    assert all(t.shape == reference.shape for t in aux)
    back = graphsel.transform(gm, ["dcp_remove_heads"])
    assert [n.name for n in back.graph.nodes] == [n.name for n in plain.graph.nodes]
    assert not any(p.startswith("dcp_heads") for p, _ in back.named_modules())


@pytest.mark.parametrize("name,pivots", [("resnet18", ["layer2.0", "layer3.1"]),
                                         ("resnet50", ["layer1.2", "layer2.2", "layer3.1", "layer3.4", "layer4.1"])])
def test_torchvision_resnet_heads_exact(name, pivots):
    torchvision = pytest.importorskip("torchvision")
    model = S.randomize_norm_layers(torchvision.models.get_model(name, weights=None, num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    gm = graphsel.transform(model, [("dcp_heads", {"heads": "auto"})], x, n_random_inputs=1)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    names = [h["pivot"] for h in dcp.heads_of(gm)]
    # the pivot is the block's final ReLU (post-activation blocks), found from the add
    assert names == [p.replace(".", "_") + "_relu_2" if name == "resnet50" else p.replace(".", "_") + "_relu_1"
                     for p in pivots]


def test_resnet56_structure_and_auto_heads():
    gm = graphsel.trace(preact_resnet_cifar(56).eval(), torch.randn(1, 3, 8, 8))
    s = dcp.find_structure(gm, graphsel.analyze_channels(gm))
    assert (len(s.blocks), s.stages, s.depth) == (27, 3, 56)
    assert s.heads_for("auto") == 6 and s.heads_for(3) == 3
    layers, _ = dcp.candidate_layers(gm, graphsel.analyze_channels(gm), s, "block_internal")
    # the second conv of every basic block: never a conv reading the residual stream
    assert [l.module for l in layers] == [f"features.{i}.{j}.conv2" for i in range(3) for j in range(9)]
    assert all(l.producers == (l.module.replace("conv2", "conv1"),) for l in layers)


# ------------------------------------------------------------------------------------------------
# selection → fold_masks → materialize

@settings(max_examples=8, suppress_health_check=[HealthCheck.large_base_example])
@given(arch=architectures(("residual", "conv", "preact", "se"), required=("residual",), head=True,
                          min_blocks=1, max_blocks=3),
       ratio=st.sampled_from([0.3, 0.5, 0.7]), lam=st.sampled_from([0.0, 1.0]))
def test_dcp_then_fold_and_materialize_equals_the_masked_model(arch, ratio, lam):
    model = arch.build()
    x = arch.example_inputs()
    snap = model_snapshot(model)
    data = labelled((4,) + arch.input_shape[1:], arch.out_shape[1])
    options = dict(ratio=ratio, data=data, lam=lam, steps=1, head_iters=3, progress=False)
    plain = graphsel.trace(model, x)
    layers, _ = dcp.candidate_layers(plain, graphsel.analyze_channels(plain),
                                     dcp.find_structure(plain, graphsel.analyze_channels(plain)), "block_internal")
    masked = graphsel.transform(model, [("dcp", options)], x)
    assert_model_unchanged(model, snap)
    masks = graphsel.get_masks(masked)
    state = dcp.dcp_state(masked)["layers"]
    assert sorted(state) == sorted(l.module for l in layers)
    for layer in layers:
        w = masked.get_submodule(layer.module).weight
        kept = state[layer.module]["kept"]
        assert len(kept) == dcp.keep_count(layer.channels, ratio)
        removed = sorted(set(range(layer.channels)) - set(kept))
        assert sorted(masks.consumer.get(layer.module, ())) == removed
        assert not w[:, removed].any()                      # exactly zero
    slim = graphsel.transform(masked, ["fold_masks", "materialize"], n_random_inputs=1)   # verified vs oracle
    with torch.no_grad():                                   # zero columns: the plain forward is the masked model
        S.assert_same_function(masked, slim, x)


def test_dcp_on_preact_resnet_with_phase_one_heads():
    torch.manual_seed(0)
    model = preact_resnet_cifar(14, in_channels=1).eval()
    x = torch.randn(2, 1, 8, 8)
    data = labelled((8, 1, 8, 8), 10, batches=2)
    gm = graphsel.transform(model, [("dcp_heads", {"heads": 2})], x)
    result = dcp.finetune(gm, data, mode="sum", progress=False)
    assert result.steps == 2 and set(result.losses) == {"final", "aux0", "aux1"}
    slim = graphsel.transform(gm, [("dcp", {"ratio": 0.75, "data": data, "steps": 1, "progress": False}),
                                   "fold_masks", "materialize"])
    rows = {r.name: r for r in graphsel.graphsel_meta(slim).history}
    assert rows["dcp"].stats["heads"] == 2 and rows["dcp"].stats["heads_inserted"] is False
    assert not dcp.heads_of(slim)
    segments = {p: r["segment"] for p, r in dcp.dcp_state(slim)["layers"].items()}
    # 6 blocks, per = 6 // 3 + 1 = 3: heads after blocks 3 and min(6, 5) = 5 (counted from 1)
    assert [h["block"] for h in dcp.heads_of(gm)] == [2, 4]
    assert segments == {"features.0.0.conv2": 0, "features.0.1.conv2": 0, "features.1.0.conv2": 0,
                        "features.1.1.conv2": 1, "features.2.0.conv2": 1, "features.2.1.conv2": 2}
    assert rows["materialize"].params_after < rows["materialize"].params_before


@pytest.mark.parametrize("ratio,params,macs", [(0.0, 8.556e5, 1.257e8), (0.3, 6.078e5, 9.126e7),
                                               (0.5, 4.306e5, 6.323e7), (0.7, 2.713e5, 3.978e7)])
def test_table_s5_counts_on_preact_resnet56(ratio, params, macs):
    """DCP keeps c − ⌊c·η⌋ input channels of every block-internal conv; after fold_masks →
    materialize the pre-activation ResNet-56 has the paper's sizes (conv + linear MACs at batch
    1 on 32×32; all parameters). Selection runs at 8×8 with L_M only (the counts do not depend
    on which channels are kept)."""
    model = preact_resnet_cifar(56).eval()
    x = torch.randn(1, 3, 8, 8)
    data = labelled((2, 3, 8, 8), 10)
    passes = [("dcp", {"ratio": ratio, "data": data, "lam": 0.0, "heads": 0, "steps": 0, "progress": False}),
              "fold_masks", "materialize"]
    slim = graphsel.transform(model, passes, x, verify=False)
    report = graphsel.cost(slim, torch.randn(1, 3, 32, 32))
    assert abs(report.params / params - 1) < 6e-4, report.params
    assert abs(report.macs / macs - 1) < 6e-4, report.macs


# ------------------------------------------------------------------------------------------------
# a planted problem

class Planted(nn.Module):
    """A residual block whose inner layer (a linear bottleneck, conv1 → BN → conv2) reads 8
    channels: 2 small-weight filters (L1 0.1) see the two label bits, 6 large-weight filters (L1
    2–3) see pure noise. The classifier reads only what the block writes from the informative
    channels (the noise channels reach an unread channel with weight ``noise_out``)."""

    def __init__(self, noise_out: float = 0.01):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1, bias=False)
        self.conv1 = nn.Conv2d(6, 8, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 1, bias=False)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.stem.weight.zero_()
            for i in range(3):
                self.stem.weight[i, i] = 1
            self.conv1.weight.zero_()
            self.conv1.weight[0, 0] = self.conv1.weight[1, 1] = 0.1
            for k, w in zip(range(2, 8), (2.0, 2.5, 3.0, -2.0, -2.5, -3.0)):
                self.conv1.weight[k, 2] = w
            self.conv2.weight.zero_()
            self.conv2.weight[3, 0] = self.conv2.weight[4, 1] = 4
            self.conv2.weight[5, 2:, 0, 0] = noise_out * self.conv1.weight[2:, 2, 0, 0].sign()
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            for c in range(4):
                self.fc.weight[c, 3] = 2.0 if c & 1 else -2.0
                self.fc.weight[c, 4] = 2.0 if c & 2 else -2.0

    def forward(self, x):
        x = self.stem(x)
        h = self.bn(self.conv1(x))
        return self.fc((x + self.conv2(h)).mean((2, 3)))


def planted_data(batches: int = 4, size: int = 64) -> list:
    """Balanced labels y ∈ 0..3; input channel 0/1 carries bit 0/1 of y (±5), channel 2 noise."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batches):
        y = torch.arange(size) % 4
        x = torch.randn(size, 3, 6, 6, generator=g)
        x[:, 0] = 0.1 * x[:, 0] + 5 * (2 * (y & 1) - 1).float().view(-1, 1, 1)
        x[:, 1] = 0.1 * x[:, 1] + 5 * (2 * (y >> 1 & 1) - 1).float().view(-1, 1, 1)
        out.append((x, y))
    return out


def kept_by_dcp(model, data, **options) -> set[int]:
    gm = graphsel.transform(model, [("dcp", dict(ratio=0.75, data=data, heads=0, progress=False, **options))],
                            data[0][0][:2])
    return set(dcp.dcp_state(gm)["layers"]["conv2"]["kept"])


def test_planted_informative_small_weight_channels_kept_by_dcp_not_by_l1():
    data = planted_data()
    model = Planted().eval()
    with torch.no_grad():
        assert all((model(x).argmax(1) == y).all() for x, y in data)
    assert kept_by_dcp(model, data) == {0, 1}
    assert kept_by_dcp(model, data, steps=0, score="authors") == {0, 1}
    l1 = graphsel.transform(model, [("prune", {"ratio": 0.75, "scope": "uniform", "include": ["conv1"]})],
                            data[0][0][:2])
    assert {0, 1} <= graphsel.get_masks(l1).removed["conv1"]         # L1 drops exactly the informative ones
    slim = graphsel.transform(model, [("dcp", dict(ratio=0.75, data=data, heads=0, progress=False)),
                                      "fold_masks", "materialize"], data[0][0][:2])
    with torch.no_grad():
        assert all((slim(x).argmax(1) == y).all() for x, y in data)   # still classifies perfectly
    assert slim.conv1.out_channels == 2


def test_dcp_adapt_stops_when_the_loss_stops_falling():
    data = planted_data()
    gm = graphsel.transform(Planted().eval(), [("dcp", dict(ratio=0.0, adapt=0.01, data=data, heads=0, steps=2,
                                                            progress=False))], data[0][0][:2])
    record = dcp.dcp_state(gm)["layers"]["conv2"]
    assert record["stopped"] == "adapt" and set(record["kept"]) >= {0, 1} and len(record["kept"]) <= 3
    losses = record["losses"]
    assert abs(losses[-2] - losses[-1]) <= 0.01 * losses[0] < abs(losses[0] - losses[1])


def test_channel_scores_paper_and_authors():
    g = torch.zeros(2, 3, 1, 2)
    g[0, 0] = torch.tensor([3.0, 4.0])          # column 0: one filter, ‖·‖ = 5
    g[0, 1] = torch.tensor([3.0, 0.0])          # column 1: two filters of norm 3 and 3
    g[1, 1] = torch.tensor([0.0, 3.0])
    assert torch.allclose(dcp.channel_scores(g, "paper"), torch.tensor([5.0, math.sqrt(18), 0.0]))
    assert torch.allclose(dcp.channel_scores(g, "authors"), torch.tensor([5.0, 6.0, 0.0]))


# ------------------------------------------------------------------------------------------------
# phase 1

def test_finetune_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    model = preact_resnet_cifar(8, in_channels=1)
    x = torch.randn(2, 1, 8, 8)
    data = labelled((4, 1, 8, 8), 10, batches=3)
    gm = graphsel.transform(model.eval(), [("dcp_heads", {"heads": 2})], x)
    a, b = [graphsel.transform(gm, []) for _ in range(2)]
    full = dcp.finetune(a, data, epochs=2, lr=0.05, decay=0.9, progress=False)
    path = tmp_path / "phase1.pt"
    first = dcp.finetune(b, data, epochs=2, steps=4, lr=0.05, decay=0.9, state_path=path, progress=False)
    c = graphsel.transform(gm, [])                           # a fresh process: the state comes from disk
    second = dcp.finetune(c, data, epochs=2, lr=0.05, decay=0.9, state_path=path, progress=False)
    assert (full.steps, first.steps, second.resumed_from, second.steps) == (6, 4, 4, 6)
    assert math.isclose(second.lr, full.lr)
    for (n, p), q in zip(a.state_dict().items(), c.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), atol=1e-6), n


def test_finetune_sum_and_alternate_change_heads_and_backbone():
    model = preact_resnet_cifar(8, in_channels=1).eval()
    gm = graphsel.transform(model, [("dcp_heads", {"heads": 1})], torch.randn(2, 1, 8, 8))
    data = labelled((4, 1, 8, 8), 10)
    for mode in ("sum", "alternate"):
        before = {k: v.clone() for k, v in gm.state_dict().items()}
        r = dcp.finetune(gm, data, mode=mode, progress=False)
        assert set(r.losses) == {"final", "aux0"}
        changed = {k for k, v in gm.state_dict().items() if not torch.equal(v, before[k])}
        assert any(k.startswith("dcp_heads") for k in changed) and any(k.startswith("features") for k in changed)
    assert all(m.training is False for m in gm.modules())   # the mode is restored


# ------------------------------------------------------------------------------------------------
# scope, bad input

def plain_convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def test_scope_all_on_a_plain_convnet():
    model = plain_convnet()
    x = torch.randn(2, 1, 12, 12)
    with pytest.raises(DCPError, match="scope='all'"):
        graphsel.transform(model, [("dcp", {"data": labelled((4, 1, 12, 12), 10), "progress": False})], x)
    slim = graphsel.transform(model, [("dcp", {"data": labelled((4, 1, 12, 12), 10), "scope": "all", "steps": 1,
                                               "progress": False}), "fold_masks", "materialize"], x)
    assert graphsel.graphsel_meta(slim).history[0].stats["layers"] > 0


@pytest.mark.parametrize("options,match", [
    ({"data": None}, "needs data"),
    ({"data": torch.randn(4, 1, 8, 8)}, "labelled batches"),
    ({"data": [torch.randn(4, 1, 8, 8)]}, "not an \\(inputs, targets\\) pair"),
    ({"data": [(torch.randn(4, 1, 8, 8),)]}, "need the labels"),
    ({"data": iter([(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))])}, "one-shot iterator"),
    ({"data": []}, "empty"),
    ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"ratio": "0.5"}, "ratio"),
    ({"scope": "stream"}, "scope"), ({"heads": -1}, "heads"), ({"lam": 0.0, "mse_weight": 0.0}, "no loss"),
    ({"score": "l1"}, "score"), ({"steps": 1.5}, "steps"),
])
def test_bad_options_are_clear_errors(options, match):
    good = {"data": labelled((4, 1, 8, 8), 10)}
    with pytest.raises(DCPError, match=match):
        graphsel.transform(preact_resnet_cifar(8, in_channels=1).eval(), [("dcp", {**good, **options})],
                           torch.randn(2, 1, 8, 8))


def test_model_without_logits_and_finetune_without_heads_are_clear_errors():
    arch_model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
    with pytest.raises(DCPError, match="N × K tensor of class logits"):
        graphsel.transform(preact_resnet_cifar(8, in_channels=1).features.eval(),
                           [("dcp", {"data": labelled((4, 16, 8, 8), 10)})], torch.randn(2, 16, 8, 8))
    with pytest.raises(DCPError, match="no auxiliary classifiers"):
        dcp.finetune(graphsel.trace(arch_model.eval(), torch.randn(1, 1, 4, 4)), labelled((2, 1, 4, 4), 2))
    with pytest.raises(DCPError, match="no residual blocks"):
        graphsel.transform(plain_convnet(), [("dcp_heads", {})], torch.randn(1, 1, 12, 12))
