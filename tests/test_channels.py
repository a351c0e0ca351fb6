"""Channel analysis: coupling rules on small models whose correct grouping is known by construction."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphsel
from graphsel.analysis.channels import analyze_channels


def analyse(model: nn.Module, shape=(1, 3, 8, 8)):
    gm = graphsel.trace(model.eval(), torch.randn(shape))
    return gm, analyze_channels(gm)


def group_of(a, source: str):
    gs = [g for g in a.groups if source in g.sources]
    assert len(gs) == 1, f"{source} in {len(gs)} groups"
    return gs[0]


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(torch.relu(y + self.b(y)))


def test_residual_add_couples_both_operands_position_by_position():
    _, a = analyse(Residual())
    g = group_of(a, "a")
    assert set(g.sources) == {"a", "b"}
    assert g.size == 8 and g.prunable
    # class i holds output channel i of both convs
    assert g.positions["a"] == [[i] for i in range(8)] == g.positions["b"]
    assert "c" in g.consumers and "b" in g.consumers


class Dense(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.u1 = nn.Conv2d(6, 4, 3, padding=1)
        self.u2 = nn.Conv2d(10, 4, 3, padding=1)
        self.head = nn.Conv2d(14, 5, 1)

    def forward(self, x):
        x0 = self.stem(x)
        x1 = self.u1(x0)
        x2 = self.u2(torch.cat([x0, x1], 1))
        return self.head(torch.cat([x0, x1, x2], 1))


def test_concat_keeps_sources_separate_and_records_every_reader():
    _, a = analyse(Dense())
    for src, size in (("stem", 6), ("u1", 4), ("u2", 4)):
        g = group_of(a, src)
        assert g.sources == [src] and g.size == size and g.prunable
    assert set(group_of(a, "stem").consumers) == {"u1", "u2", "head"}
    assert set(group_of(a, "u1").consumers) == {"u2", "head"}


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 7)
        self.out = nn.Linear(7, 2)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.conv(x), 4)
        return self.out(torch.relu(self.fc(x.view(x.size(0), -1))))


def test_flatten_to_linear_reads_one_block_of_features_per_channel():
    _, a = analyse(FlattenHead())
    reader = next(r for r in a.readers if r.module == "fc")
    cls = a.class_of(reader.ids)
    conv_cls = a.class_of(np.arange(*(lambda s: (s[0], s[0] + s[1]))(a.sources[next(k for k, v in a.source_module.items() if v == "conv")])))
    expected = np.repeat(conv_cls, 16)           # channel c owns features [16c, 16c + 16)
    assert np.array_equal(cls, expected)
    assert group_of(a, "fc").prunable and not group_of(a, "out").prunable   # model output is frozen


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.head(x)


def test_channel_shuffle_couples_the_same_position_of_each_group():
    _, a = analyse(Shuffle())
    g = group_of(a, "conv")
    assert g.size == 4 and g.prunable
    assert sorted(sorted(p) for p in g.positions["conv"]) == [[j, j + 4] for j in range(4)]


class ConvNeXtLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 6)
        self.scale = nn.Parameter(torch.rand(6))
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        y = x.permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))) * self.scale
        return self.head(x + y.permute(0, 3, 1, 2))


def test_channels_last_permute_layernorm_linear_and_layer_scale():
    _, a = analyse(ConvNeXtLike())
    stream = group_of(a, "conv")
    assert set(stream.sources) == {"conv", "fc2"} and stream.size == 6 and stream.prunable
    assert group_of(a, "fc1").size == 12 and group_of(a, "fc1").prunable
    assert ("param", "scale", 0) in a.slots and ("module", "norm", "chan") in a.slots
    assert any(r.kind == "reduce" and r.module == "norm" for r in a.readers)


class Attention(nn.Module):
    """SE scale (N×C×1×1) couples channels; a spatial map (N×1×H×W) is only read."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.se = nn.Conv2d(8, 8, 1)
        self.sa = nn.Conv2d(8, 1, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        x = x * torch.sigmoid(self.se(F.adaptive_avg_pool2d(x, 1)))
        x = x * torch.sigmoid(self.sa(x))
        return self.head(x)


def test_se_multiply_couples_but_spatial_attention_is_only_read():
    _, a = analyse(Attention())
    g = group_of(a, "conv")
    assert set(g.sources) == {"conv", "se"} and g.size == 8        # Torch-Pruning #510 would couple "sa" too
    sa = group_of(a, "sa")
    assert sa.sources == ["sa"] and sa.size == 1
    assert any(r.kind == "broadcast" for r in a.readers)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        return self.head(self.dw(self.g(self.a(x))))


def test_grouped_conv_prunes_uniformly_per_group_and_depthwise_carries():
    _, a = analyse(Grouped())
    ga = group_of(a, "a")                            # 8 inputs in 4 groups of 2: position r of every group coupled
    assert ga.size == 2 and sorted(map(sorted, ga.positions["a"])) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    gg = group_of(a, "g")                            # 12 outputs in 4 groups of 3
    assert gg.size == 3
    assert ("module", "dw", "chan") in a.slots      # depthwise: per-channel slot, no new source
    assert "dw" not in a.source_module.values()


class WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp1 = nn.Linear(8, 16)
        self.mlp2 = nn.Linear(16, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.mha(x, x, x, need_weights=False)[0]
        x = x + self.mlp2(torch.relu(self.mlp1(x)))
        return self.out(x)


def test_opaque_attention_is_a_barrier_with_a_reason_and_the_mlp_stays_prunable():
    gm = graphsel.trace(WithMHA().eval(), torch.randn(2, 5, 4))
    a = analyze_channels(gm)
    stream = group_of(a, "inp")
    assert not stream.prunable
    assert any("MultiheadAttention" in r for r in stream.frozen_reasons)
    assert group_of(a, "mlp1").prunable


def _fancy(x):
    return x.flip(0) * 2


class UnknownOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(torch.special.erfcx(self.a(x)))


def test_unknown_function_freezes_instead_of_passing_through():
    _, a = analyse(UnknownOp())
    g = group_of(a, "a")
    assert not g.prunable and any("erfcx" in r for r in g.frozen_reasons)


def test_registered_rule_teaches_the_analysis_a_function(private_op_table):
    graphsel.register_op(torch.special.erfcx, graphsel.OpSpec("erfcx", graphsel.ops.carry_rule))
    _, a = analyse(UnknownOp())
    assert group_of(a, "a").prunable


class BadReshape(nn.Module):
    """A reshape that scatters channels over the spatial axis cannot survive channel removal."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)[:, :, :4, :4]                   # 1×6×4×4
        return self.b(y.reshape(1, 4, 6, 4))          # each new "channel" holds parts of 1-2 old ones


def test_reshape_across_channel_boundaries_couples_the_channels_it_mixes():
    gm, a = analyse(BadReshape())
    g = group_of(a, "a")
    # new channel 0 holds old 0 and half of 1, new 1 the rest of 1 and 2, ...: {0,1,2} and {3,4,5} move together
    assert sorted(map(sorted, g.positions["a"])) == [[0, 1, 2], [3, 4, 5]]
    from graphsel.analysis.masks import add_group_mask
    from graphsel.pipeline.oracle import oracle_forward
    add_group_mask(gm, "a", [0])
    x = graphsel.ir.tracing.example_inputs_of(gm)
    with torch.no_grad():
        ref = oracle_forward(gm, x)
    slim = graphsel.transform(gm, ["fold_masks", "materialize"])
    assert slim.get_submodule("a").out_channels == 3
    torch.testing.assert_close(slim(*x), ref)


def test_analysis_requires_shapes():
    gm = torch.fx.symbolic_trace(Residual())
    with pytest.raises(ValueError, match="needs shapes"):
        analyze_channels(gm)


def test_input_and_output_channels_are_frozen():
    _, a = analyse(Residual())
    c = group_of(a, "c")
    assert not c.prunable and "model output" in c.frozen_reasons
    reader = next(r for r in a.readers if r.module == "a")
    assert (reader.ids == -1).all()                  # the input's channels are not removable


# -- grouping internals -------------------------------------------------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

from graphsel.analysis.channels import _segment_keys  # noqa: E402


def _reference_keys(runs: list[list[int]]) -> list[int]:
    keys: dict[tuple, int] = {}
    return [keys.setdefault(tuple(r), len(keys)) for r in runs]


@settings(max_examples=200, deadline=None)
@given(runs=st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=4, unique=True).map(sorted),
                     min_size=1, max_size=30),
       collide=st.booleans())
def test_segment_keys_equal_exactly_when_runs_equal(runs, collide):
    """Hashed run keys are exact: with weights that make every run of the same length collide,
    the fallback still separates different runs and numbers them by first occurrence."""
    values = np.array([v for r in runs for v in r], dtype=np.int64)
    seg_len = np.array([len(r) for r in runs], dtype=np.int64)
    seg_start = np.concatenate([[0], np.cumsum(seg_len)[:-1]]).astype(np.int64)
    weights = np.ones(7, dtype=np.uint64) if collide else None
    assert _segment_keys(values, seg_start, seg_len, weights).tolist() == _reference_keys(runs)


def test_segment_sums_counts_runs_including_empty_ones():
    import numpy as np
    from graphsel.analysis.channels import segment_sums
    values = np.array([True, False, True, True, False])
    assert segment_sums(values, np.array([0, 2, 0, 3, 0])).tolist() == [0, 1, 0, 2, 0]
    assert segment_sums(np.array([], dtype=bool), np.array([0, 0])).tolist() == [0, 0]
