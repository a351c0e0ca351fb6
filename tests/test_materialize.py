"""Masks, the oracle, Prune, FoldMasks and Materialize.

Properties over the Hypothesis architectures: random group masks on every prunable group and
random consumer masks on random readers — the materialised graph equals the mask oracle and an
independent reference (``tests/mask_reference.py``: the removed channels zeroed into the weights
by construction, no channel analysis involved), the requested channels are gone; removing
channels the model already zeroes keeps the model's own function. Every draw removes something.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

import graphsel
from graphsel.analysis.channels import analyze_channels
from graphsel.analysis.masks import add_consumer_mask, add_group_mask, get_masks, removal_positions, resolve_masks
from graphsel.pipeline.oracle import oracle_forward
from graphsel.ir.tracing import example_inputs_of
from graphsel.passes.prune import relu_gaussian_mean
from mask_reference import KINDS as REFERENCE_KINDS, reference_model, supported
from strategies import architectures, assert_same_function


def random_masks(gm, rng: random.Random, p_group: float = 0.8, p_consumer: float = 0.4
                 ) -> tuple[dict[str, set[int]], dict[str, set[int]]]:
    """Random removals on prunable groups (never all of a group) and random consumer masks,
    recorded on ``gm``; returns what was requested: (source -> output positions, consumer ->
    input positions). Mask sets that leave some tensor without channels (a legitimate
    MaskError, tested separately) are rejected with ``assume``."""
    a = analyze_channels(gm)
    removed = set()
    for g in a.groups:
        if g.prunable and rng.random() < p_group:
            k = rng.randint(1, len(g.prunable_classes) - 1)
            removed.update(rng.sample(g.prunable_classes, k))
    group = removal_positions(a, removed)
    for src, pos in group.items():
        add_group_mask(gm, src, pos)
    consumer: dict[str, set[int]] = {}
    for r in a.readers:
        if r.kind in ("conv_in", "linear_in") and r.module and rng.random() < p_consumer:
            m = gm.get_submodule(r.module)
            if getattr(m, "groups", 1) != 1:
                continue
            n = len(r.ids)
            consumer[r.module] = set(rng.sample(range(n), rng.randint(1, max(1, n // 2))))
            add_consumer_mask(gm, r.module, consumer[r.module])
    try:
        resolve_masks(gm)
    except graphsel.MaskError as e:
        assume("every channel" not in str(e) and "all " not in str(e))
        raise
    return group, consumer


def param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def assert_requested_removals_happened(model: nn.Module, slim: nn.Module, group: dict[str, set[int]],
                                       exact: bool) -> None:
    """Every source lost (at least, with consumer masks whose liveness removes more) the output
    channels its group mask named."""
    for src, pos in group.items():
        before, after = model.get_submodule(src), slim.get_submodule(src)
        attr = "out_channels" if hasattr(before, "out_channels") else "out_features"
        want = getattr(before, attr) - len(pos)
        got = getattr(after, attr)
        assert got == want if exact else got <= want, f"{src}: {got} {attr}, expected {want}"


@settings(max_examples=60)
@given(arch=architectures(), seed=st.integers(0, 2**31 - 1))
def test_materialize_equals_the_oracle_and_the_reference_for_random_masks(arch, seed):
    model = arch.build()
    x = arch.example_inputs()
    gm = graphsel.trace(model, x)
    group, consumer = random_masks(gm, random.Random(seed))
    assume(group)                                        # at least one channel class removed
    event(f"sources masked: {min(len(group), 5)}{'+' if len(group) >= 5 else ''}")
    event(f"consumer masks: {bool(consumer)}")
    with torch.no_grad():
        oracle = oracle_forward(gm, x)
    slim = graphsel.transform(gm, ["fold_masks", "materialize"], verify=True)
    with torch.no_grad():
        got = slim(*x)
    torch.testing.assert_close(got, oracle, rtol=1e-4, atol=1e-5)
    assert not graphsel.graphsel_meta(slim).masks
    assert_requested_removals_happened(model, slim, group, exact=not consumer)
    assert param_count(slim) < param_count(model)
    if supported(model):                                 # the independent reference, and the oracle against it
        event("checked against the independent reference")
        with torch.no_grad():
            ref = reference_model(model, group, consumer)(*x)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(oracle, ref, rtol=1e-4, atol=1e-5)


@settings(max_examples=40)
@given(arch=architectures(kinds=REFERENCE_KINDS), seed=st.integers(0, 2**31 - 1))
def test_removing_channels_the_model_already_zeroes_keeps_its_function(arch, seed):
    """Masks on channels whose filters, norms and readers the model itself already zeroes: the
    slim model computes exactly the model's own function (no oracle involved), with fewer parameters."""
    base = arch.build()
    assume(supported(base))
    x = arch.example_inputs()
    gm = graphsel.trace(base, x)
    group, _ = random_masks(gm, random.Random(seed), p_consumer=0.0)
    assume(group)
    model = reference_model(base, group)                 # the same masks, zeroed into the weights
    gm = graphsel.trace(model, x)
    for src, pos in group.items():
        add_group_mask(gm, src, pos)
    slim = graphsel.transform(gm, ["fold_masks", "materialize"], verify=False)
    assert_same_function(model, slim, x)
    assert_same_function(model, slim, arch.example_inputs(seed=arch.seed + 1))
    assert_requested_removals_happened(model, slim, group, exact=True)
    assert param_count(slim) < param_count(model)


@settings(max_examples=30)
@given(arch=architectures(), ratio=st.sampled_from([0.3, 0.5, 0.7]),
       criterion=st.sampled_from(["l1", "bn_gamma", "ecdm"]), scope=st.sampled_from(["global", "uniform"]))
def test_prune_fold_materialize_pipeline_is_verified_and_smaller(arch, ratio, criterion, scope):
    model = arch.build()
    x = arch.example_inputs()
    sizes = [len(g.prunable_classes) for g in analyze_channels(graphsel.trace(model, x)).groups if g.prunable]
    # draws where the ratio asks for at least one channel
    assume(int(ratio * sum(sizes)) >= 1 if scope == "global" else any(int(ratio * n) >= 1 for n in sizes))
    pruned = graphsel.transform(model, [("prune", {"ratio": ratio, "criterion": criterion, "scope": scope})], x)
    requested = {src: set(pos) for src, pos in get_masks(pruned).removed.items()}
    gm = graphsel.transform(pruned, ["fold_masks", "materialize"])
    hist = graphsel.graphsel_meta(gm).history
    assert [r.name for r in hist] == ["prune", "fold_masks", "materialize"]
    removed = hist[0].stats["classes_removed"]
    event(f"classes removed: {min(removed, 10)}{'+' if removed >= 10 else ''}")
    assert removed > 0 and requested
    assert_requested_removals_happened(model, gm, requested, exact=True)
    assert param_count(gm) < param_count(model)
    if supported(model):      # the slim model is the model with the pruned channels zeroed by construction
        assert_same_function(reference_model(model, requested), gm, x)


def test_densenet_consumer_mask_becomes_a_gather_before_the_units_own_batchnorm():
    tv = pytest.importorskip("torchvision")
    model = tv.models.densenet121().eval()
    x = torch.randn(1, 3, 64, 64)
    gm = graphsel.trace(model, x)
    # unit 3 of block 1 stops reading the first 8 channels of the stem; unit 4 still reads them
    add_consumer_mask(gm, "features.denseblock1.denselayer3.conv1", range(8))
    with torch.no_grad():
        ref = oracle_forward(gm, (x,))
    slim = graphsel.transform(gm, ["fold_masks", "materialize"])
    with torch.no_grad():
        torch.testing.assert_close(slim(x), ref)
    nodes = list(slim.graph.nodes)
    gather = [n for n in nodes if n.target is torch.index_select]
    assert len(gather) == 1
    (user,) = gather[0].users
    assert user.target == "features.denseblock1.denselayer3.norm1"      # before the unit's own BN
    assert slim.get_submodule("features.denseblock1.denselayer3.norm1").num_features == 64 + 2 * 32 - 8
    assert slim.get_submodule("features.denseblock1.denselayer4.norm1").num_features == 64 + 3 * 32


def test_channel_nobody_reads_is_removed_with_its_producer_filter():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = graphsel.trace(model, x)
    add_consumer_mask(gm, "3", [1, 5])
    folded = graphsel.transform(gm, ["fold_masks"])
    assert get_masks(folded).removed == {"0": {1, 5}} and not get_masks(folded).consumer
    slim = graphsel.transform(folded, ["materialize"])
    assert slim.get_submodule("0").out_channels == 6 and slim.get_submodule("1").num_features == 6
    assert slim.get_submodule("3").in_channels == 6


def test_flatten_block_partially_masked_zeroes_columns_exactly():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 4 * 4, 5)

        def forward(self, x):
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.conv(x), 4), 1))

    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = graphsel.trace(model, x)
    add_consumer_mask(gm, "fc", [0, 1, 2, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31])
    with torch.no_grad():
        ref = oracle_forward(gm, (x,))
    slim = graphsel.transform(gm, ["fold_masks", "materialize"])
    # channel 1 (features 16..31) is entirely unread: removed; channel 0 partially: zero columns
    assert slim.get_submodule("conv").out_channels == 3 and slim.get_submodule("fc").in_features == 48
    with torch.no_grad():
        torch.testing.assert_close(slim(x), ref)


def test_prune_round_to_keeps_multiples():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18().eval()
    gm = graphsel.transform(model, [("prune", {"ratio": 0.4, "round_to": 8}), "fold_masks", "materialize"],
                            torch.randn(1, 3, 64, 64))
    for name, m in gm.named_modules():
        if isinstance(m, nn.Conv2d) and name != "conv1":
            assert m.out_channels % 8 == 0, (name, m.out_channels)


def test_prune_target_macs_reaches_the_target():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    before = graphsel.cost(model, x).macs
    gm = graphsel.transform(model, [("prune", {"target_macs": 0.5}), "fold_masks", "materialize"], x)
    after = graphsel.cost(gm, x).macs
    assert after <= 0.5 * before * 1.02 and after >= 0.3 * before


def test_relu_gaussian_mean_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    beta = torch.tensor([-1.0, -0.2, 0.0, 0.5, 2.0])
    gamma = torch.tensor([0.5, 1.0, 2.0, -0.7, 0.3])
    samples = beta.double() + gamma.double() * torch.randn(2_000_000, 5, generator=g, dtype=torch.float64)
    mc = samples.clamp_min(0).mean(0)
    formula = relu_gaussian_mean(beta, gamma)
    assert torch.allclose(formula, mc, rtol=0.01)
    assert relu_gaussian_mean(torch.tensor([0.3, -0.3]), torch.tensor([0.0, 0.0])).tolist() == [pytest.approx(0.3), 0.0]


# -- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "half", True])
def test_prune_rejects_ratios_outside_0_1(ratio):
    with pytest.raises(ValueError, match="ratio"):
        graphsel.resolve_pass(("prune", {"ratio": ratio}))


def test_prune_rejects_unknown_criterion():
    with pytest.raises(ValueError, match="criterion.*l1"):
        graphsel.resolve_pass(("prune", {"criterion": "magic"}))


def _residual_gm():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.a(x)
            z = self.b(y)
            t = z.flatten(2).transpose(1, 2)
            z = z + self.mha(t, t, t, need_weights=False)[0].transpose(1, 2).reshape(z.shape)
            return self.head(y + z)

    x = torch.randn(1, 3, 6, 6)
    return graphsel.trace(Net().eval(), x)


def test_mask_on_a_frozen_group_names_the_barrier():
    gm = _residual_gm()
    add_group_mask(gm, "a", [0])
    with pytest.raises(graphsel.MaskError, match="frozen.*MultiheadAttention"):
        graphsel.transform(gm, ["fold_masks"])


def test_mask_removing_every_channel_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    gm = graphsel.trace(model, torch.randn(1, 3, 8, 8))
    add_group_mask(gm, "0", range(4))
    with pytest.raises(graphsel.MaskError, match="all 4 output channels of '0'"):
        graphsel.transform(gm, ["materialize"])


def test_mask_on_unknown_module_suggests_a_name():
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 4, 3))
    model.add_module("relu", nn.ReLU())
    model.add_module("conv2", nn.Conv2d(4, 2, 1))
    gm = graphsel.trace(model.eval(), torch.randn(1, 3, 8, 8))
    add_consumer_mask(gm, "conv3", [0])
    with pytest.raises(graphsel.MaskError, match="Did you mean 'conv2'"):
        graphsel.transform(gm, ["fold_masks"])


def test_mask_positions_out_of_range_and_of_wrong_type():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    gm = graphsel.trace(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="integers"):
        add_group_mask(gm, "0", [0.5])
    add_group_mask(gm, "0", [7])
    with pytest.raises(graphsel.MaskError, match="valid: 0..3"):
        graphsel.transform(gm, ["materialize"])


def test_materialize_without_masks_is_a_reported_no_op():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    gm = graphsel.transform(model, ["materialize"], torch.randn(1, 3, 8, 8))
    rec = graphsel.graphsel_meta(gm).history[0]
    assert not rec.modified and any("nothing to materialize" in d.message for d in rec.diagnostics)


class _ChunkOfTwo(nn.Module):
    """A 2-channel tensor chunked into two 1-channel pieces: removing either channel empties a piece."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 1)
        self.branch = nn.Conv2d(1, 1, 1)
        self.out = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, 1)
        return self.out(torch.cat([a, self.branch(b)], 1))


@pytest.mark.parametrize("scope", ["global", "uniform"])
def test_prune_never_empties_one_piece_of_a_split(scope):
    torch.manual_seed(0)
    model = _ChunkOfTwo().eval()
    gm = graphsel.transform(model, [("prune", {"ratio": 0.5, "scope": scope}), "fold_masks", "materialize"],
                            torch.randn(2, 1, 6, 6))
    assert graphsel.graphsel_meta(gm).history[2].max_abs <= graphsel.graphsel_meta(gm).history[2].tolerance
    assert gm.get_submodule("stem").out_channels == 2     # each piece keeps its one channel


def test_materialize_reuses_the_fold_of_fold_masks_only_while_graph_and_masks_are_unchanged(monkeypatch):
    import graphsel.passes.fold_masks as fm
    from graphsel import Contract, Pass, PassResult

    calls = []
    real = fm.fold
    monkeypatch.setattr(fm, "fold", lambda gm, a, **kw: calls.append(1) or real(gm, a, **kw))

    class MasksOneMore(Pass):
        name = "masks_one_more"
        contract = Contract.STRUCTURAL

        def run(self, gm, ctx):
            src = next(iter(get_masks(gm).removed))
            kept = set(range(gm.get_submodule(src).out_channels)) - get_masks(gm).removed[src]
            add_group_mask(gm, src, [min(kept)])
            return PassResult(gm, False)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = (torch.randn(1, 3, 9, 9),)
    graphsel.transform(model, [("prune", {"ratio": 0.25}), "fold_masks", "materialize"], x, verify=False)
    assert len(calls) == 1
    calls.clear()
    slim = graphsel.transform(model, [("prune", {"ratio": 0.25}), "fold_masks", MasksOneMore(), "materialize"], x)
    assert len(calls) == 2                                 # the masks changed after fold_masks
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())


def test_the_oracle_follows_masks_added_after_it_ran():
    """The oracle's per-node plan is kept with the resolved masks: masks added later give a new
    plan, and the output equals that of an oracle built from scratch for the final masks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1)).eval()
    x = (torch.randn(2, 3, 8, 8),)
    gm = graphsel.trace(model, x)
    with torch.no_grad():
        plain = oracle_forward(gm, x)
        add_group_mask(gm, "0", [0, 1])
        first = oracle_forward(gm, x)
        add_group_mask(gm, "0", [2, 3, 4])
        second = oracle_forward(gm, x)
        fresh = graphsel.trace(model, x)
        add_group_mask(fresh, "0", [0, 1, 2, 3, 4])
        want = oracle_forward(fresh, x)
    assert not torch.equal(plain, first) and not torch.equal(first, second)
    torch.testing.assert_close(second, want, rtol=0, atol=0)


def test_masks_and_the_oracle_do_not_keep_the_graph_module_alive():
    """Resolved masks are cached weakly by module; nothing they hold (the oracle's plan
    included) may reach the module, or every masked model would leak."""
    import gc
    import weakref
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    x = (torch.randn(1, 3, 8, 8),)
    gm = graphsel.trace(model, x)
    add_group_mask(gm, "0", [0, 1])
    with torch.no_grad():
        oracle_forward(gm, x)
    alive = weakref.ref(gm)
    del gm
    gc.collect()
    assert alive() is None


class _SliceViewGroupNorm(nn.Module):
    """Constructs whose size arguments materialize must rewrite: GroupNorm's group count, a channel
    slice's bounds, a view's literal channel count (all sizes literal: next to a size computed at
    run time, the analysis freezes a literal channel count instead)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.gn(self.conv1(x)))
        x = torch.relu(self.conv2(x))[:, 4:12]
        x = self.conv3(x)
        return self.fc(x.view(2, 8, 64).mean(-1))


def test_materialize_rewrites_group_counts_slice_bounds_and_literal_view_sizes():
    torch.manual_seed(0)
    model = _SliceViewGroupNorm().eval()
    with torch.no_grad():                                # non-trivial affine GroupNorm
        model.gn.weight.uniform_(0.5, 1.5)
        model.gn.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(2, 3, 8, 8),)
    gm = graphsel.trace(model, x)
    add_group_mask(gm, "conv1", {4, 5, 6, 7})            # the second of GroupNorm's four groups
    add_group_mask(gm, "conv2", {3, 5, 11, 13})          # inside and outside the slice [4, 12)
    add_group_mask(gm, "conv3", {2})                     # the view's literal 8 becomes 7
    with torch.no_grad():
        oracle = oracle_forward(gm, x)
    slim = graphsel.transform(gm, ["fold_masks", "materialize"], verify=True)
    assert (slim.gn.num_groups, slim.gn.num_channels) == (3, 12)
    assert slim.conv2.out_channels == 12 and slim.conv3.in_channels == 6 and slim.conv3.out_channels == 7
    assert slim.fc.in_features == 7
    with torch.no_grad():
        torch.testing.assert_close(slim(*x), oracle, rtol=1e-4, atol=1e-5)
    # the oracle itself against the model with those channels' filters zeroed, written out by hand
    ref = _SliceViewGroupNorm().eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for conv, pos in ((ref.conv2, [3, 5, 11, 13]), (ref.conv3, [2])):
            conv.weight[pos] = 0
            conv.bias[pos] = 0
        x1 = torch.relu(ref.gn(ref.conv1(x[0])))
        kept = [c for c in range(16) if c not in (4, 5, 6, 7)]
        gn_kept = nn.GroupNorm(3, 12)
        gn_kept.weight.copy_(ref.gn.weight[kept])
        gn_kept.bias.copy_(ref.gn.bias[kept])
        x1 = torch.zeros_like(x1)
        x1[:, kept] = torch.relu(gn_kept(ref.conv1(x[0])[:, kept]))
        y = torch.relu(ref.conv2(x1))[:, 4:12]
        y = ref.conv3(y)
        want = ref.fc(y.view(2, 8, 64).mean(-1))
    torch.testing.assert_close(oracle, want, rtol=1e-4, atol=1e-5)
