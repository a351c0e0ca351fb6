"""Selective convolution: the module, the shift, ECDM, dealloc/realloc, insertion and lowering on
hand-built cases, and bad input. Properties over random architectures are in
``test_selective_conv_properties.py``; the torchvision zoo in ``test_selective_conv_zoo.py``."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphsel
from graphsel.analysis.masks import get_masks
from graphsel.passes.selective_conv import (InsertSelectiveConv, LowerSelectiveConv, SelectiveConv2d, bilinear_shift,
                                            dealloc, ecdm, expected_activation, normalized_ecdm, randomize_state,
                                            realloc, selective_modules, shift_kernels)
from graphsel.ir.shapes import propagate_shapes


# ------------------------------------------------------------------------------------------------
# helpers

def random_bn(c: int, g: torch.Generator | None = None, negative: bool = True) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        sign = torch.where(torch.rand(c, generator=g) < 0.3, -1.0, 1.0) if negative else 1.0
        bn.weight.copy_((torch.rand(c, generator=g) + 0.3) * sign)
        bn.bias.copy_(torch.randn(c, generator=g) * 0.7)
    return bn.eval()


def make_sconv(cin=6, cout=5, k=1, *, padding_mode="zeros", bias=False, K=None, gamma=1e-3, seed=0) -> SelectiveConv2d:
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, padding_mode=padding_mode, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
        if bias:
            conv.bias.copy_(torch.randn(cout, generator=g))
    return SelectiveConv2d(random_bn(cin, g), conv, K=K, gamma=gamma).eval()


def gaussian_inputs(m: SelectiveConv2d, n: int, hw: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose BN output is N(β_i, γ_i²) at every pixel (the ECDM model's assumption)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, m.in_channels, hw, hw, generator=g, dtype=torch.float64)
    bn = m.bn
    return (bn.running_mean.double().view(1, -1, 1, 1)
            + (bn.running_var.double() + bn.eps).sqrt().view(1, -1, 1, 1) * z).float()


def reference_sconv_forward(m: SelectiveConv2d, x: torch.Tensor) -> torch.Tensor:
    """methods.md §1 forward, written slot by slot (eval mode)."""
    slots = []
    for i in range(m.in_channels):
        s = int(m.source[i])
        ch = x[:, i:i + 1] if s < 0 else bilinear_shift(x[:, s:s + 1], m.shift[i:i + 1])
        slots.append(ch)
    h = F.relu(m.bn(torch.cat(slots, 1)))
    h = h * m.is_open.view(1, -1, 1, 1)
    return m.conv(h)


def numpy_shift(x: np.ndarray, bx: float, by: float) -> np.ndarray:
    """Bilinear read of ``x`` (H×W) at (y + by, x + bx), replicate borders: the definition."""
    h, w = x.shape
    out = np.empty_like(x)
    for yy in range(h):
        for xx in range(w):
            fy, fx = yy + by, xx + bx
            y0, x0 = math.floor(fy), math.floor(fx)
            ty, tx = fy - y0, fx - x0
            def px(a, b):
                return x[min(max(a, 0), h - 1), min(max(b, 0), w - 1)]
            out[yy, xx] = ((1 - ty) * ((1 - tx) * px(y0, x0) + tx * px(y0, x0 + 1))
                           + ty * ((1 - tx) * px(y0 + 1, x0) + tx * px(y0 + 1, x0 + 1)))
    return out


class PreAct(nn.Module):
    """BN → ReLU (spelling) → [Dropout (spelling)] → Conv, for spelling tests."""

    def __init__(self, relu: str = "module", dropout: str | None = None, cin=6, cout=4, k=1, bias=False, groups=1):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=relu == "module_inplace")
        self.drop = nn.Dropout2d(0.3) if dropout == "module" else None
        self.spelling, self.dropout = relu, dropout
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias, groups=groups)

    def forward(self, x):
        x = self.bn(x)
        s = self.spelling
        if s.startswith("module"):
            x = self.relu(x)
        elif s == "functional":
            x = F.relu(x)
        elif s == "functional_inplace":
            x = F.relu(x, inplace=True)
        elif s == "torch":
            x = torch.relu(x)
        elif s == "torch_inplace":
            x = torch.relu_(x)
        elif s == "method":
            x = x.relu()
        elif s == "method_inplace":
            x = x.relu_()
        if self.drop is not None:
            x = self.drop(x)
        elif self.dropout == "functional":
            x = F.dropout(x, p=0.25, training=self.training)
        return self.conv(x)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            fresh = random_bn(m.num_features, g)
            m.load_state_dict(fresh.state_dict())
    return model.eval()


def run_pass(p, gm):
    """Run a pass directly on a copy (no pipeline) and re-propagate shapes."""
    out = p(copy.deepcopy(gm)).gm
    propagate_shapes(out, graphsel.ir.tracing.example_inputs_of(gm))
    return out


# ------------------------------------------------------------------------------------------------
# shift

@pytest.mark.parametrize("h,w", [(5, 7), (7, 4), (1, 6), (6, 1), (2, 2)])
def test_bilinear_shift_is_exactly_b_pixels_with_replicate_borders(h, w):
    g = torch.Generator().manual_seed(h * 10 + w)
    x = torch.randn(2, 4, h, w, generator=g, dtype=torch.float64)
    shift = torch.tensor([[0.0, 0.0], [1.0, -2.0], [0.37, -1.62], [-3.4, 2.25]], dtype=torch.float64)
    got = bilinear_shift(x, shift)
    for n in range(2):
        for s in range(4):
            want = numpy_shift(x[n, s].numpy(), float(shift[s, 0]), float(shift[s, 1]))
            np.testing.assert_allclose(got[n, s].numpy(), want, atol=1e-12)
    # The export form (depthwise conv over a replicate-padded map) is the same operation.
    kernels, (ry, rx) = shift_kernels(shift, torch.float64)
    lowered = F.conv2d(F.pad(x, (rx, rx, ry, ry), mode="replicate"), kernels, groups=4)
    torch.testing.assert_close(lowered, got, atol=1e-12, rtol=0)
    # Zero and integer shifts are plain copies in the export form.
    assert torch.equal(lowered[:, 0], x[:, 0])


def test_bilinear_shift_is_differentiable_in_input_and_shift():
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.3, -0.6], [1.2, 0.45]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bilinear_shift, (x, b))


def test_bilinear_shift_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="shift must have shape"):
        bilinear_shift(torch.randn(1, 3, 4, 4), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="N×C×H×W"):
        bilinear_shift(torch.randn(3, 4, 4), torch.zeros(3, 2))


# ------------------------------------------------------------------------------------------------
# module

def test_fresh_selective_conv_equals_the_chain_it_holds():
    m = make_sconv(6, 5, 3, bias=True)
    x = torch.randn(2, 6, 7, 9)
    torch.testing.assert_close(m(x), m.conv(F.relu(m.bn(x))), rtol=0, atol=0)
    assert m.K == 0 and make_sconv(6, 5, 1).K == 3
    assert m.is_open.tolist() == [1.0] * 6 and m.source.tolist() == [-1] * 6
    assert m.shift.shape == (6, 2) and isinstance(m.shift, nn.Parameter)


def test_forward_follows_the_slot_definition():
    m = make_sconv(6, 5, 3)
    with torch.no_grad():
        m.is_open.copy_(torch.tensor([1, 0, 1, 1, 0, 1.0]))
        m.source.copy_(torch.tensor([-1, -1, 0, 5, 2, -1]))
        m.shift.copy_(torch.tensor([[0, 0], [0, 0], [0.5, -1.25], [2.0, 1.0], [0.3, 0.3], [0, 0]]))
    x = torch.randn(2, 6, 6, 5)  # non-square
    torch.testing.assert_close(m(x), reference_sconv_forward(m, x))
    # In-place edits of the buffers are picked up without an explicit sync().
    with torch.no_grad():
        m.source[3] = -1
    torch.testing.assert_close(m(x), reference_sconv_forward(m, x))


def test_gradients_reach_the_shift_of_copies_only():
    m = make_sconv(4, 3, 1).train()
    with torch.no_grad():
        m.source[2] = 0
        m.shift[2] = torch.tensor([0.4, -0.3])
    m(torch.randn(4, 4, 6, 6)).square().sum().backward()
    assert m.shift.grad[2].abs().sum() > 0
    assert m.shift.grad[[0, 1, 3]].abs().sum() == 0


def test_constructor_rejects_bad_options():
    conv, bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    with pytest.raises(ValueError, match="K .* must be ≥ 0"):
        SelectiveConv2d(bn, conv, K=-1)
    with pytest.raises(ValueError, match="gamma"):
        SelectiveConv2d(bn, conv, gamma=0.0)
    with pytest.raises(ValueError, match="groups=1"):
        SelectiveConv2d(bn, nn.Conv2d(4, 4, 1, groups=2))
    with pytest.raises(ValueError, match="3 channels"):
        SelectiveConv2d(nn.BatchNorm2d(3), conv)


# ------------------------------------------------------------------------------------------------
# ECDM

@pytest.mark.parametrize("gamma,beta", [(1.0, 0.0), (0.5, 0.8), (-0.7, 0.3), (1.3, -1.0), (0.2, -0.25),
                                        (2.0, 1.5), (0.0, 0.6), (0.0, -0.4)])
def test_expected_activation_matches_monte_carlo(gamma, beta):
    bn = nn.BatchNorm2d(1)
    with torch.no_grad():
        bn.weight.fill_(gamma)
        bn.bias.fill_(beta)
    e = float(expected_activation(bn)[0])
    g = torch.Generator().manual_seed(1)
    samples = beta + abs(gamma) * torch.randn(4_000_000, generator=g, dtype=torch.float64)
    mc = float(samples.clamp_min(0).mean())
    assert abs(e - mc) <= 0.01 * abs(mc) + 1e-12, (e, mc)


@pytest.mark.parametrize("k,padding_mode", [(1, "zeros"), (3, "replicate")])
def test_ecdm_predicts_the_mean_output_change_of_removing_a_slot(k, padding_mode):
    m = make_sconv(5, 4, k, padding_mode=padding_mode, seed=3)
    x = gaussian_inputs(m, 64, 24, seed=4)
    with torch.no_grad():
        full = m(x)
        d = ecdm(m, dtype=torch.float64)
        for i in range(m.in_channels):
            m.is_open[i] = 0
            measured = (full - m(x)).double().mean(dim=(0, 2, 3))
            m.is_open[i] = 1
            scale = d.abs().max()
            assert torch.allclose(measured, d[:, i], atol=0.02 * float(scale)), (i, measured, d[:, i])
    n = normalized_ecdm(m)
    torch.testing.assert_close(n.sum(dim=1), torch.ones(4, dtype=torch.float64))


def test_ecdm_of_closed_slots_is_zero():
    m = make_sconv()
    with torch.no_grad():
        m.is_open[2] = 0
    assert ecdm(m)[:, 2].abs().sum() == 0


# ------------------------------------------------------------------------------------------------
# dealloc / realloc

def test_dealloc_closes_the_least_damaging_prefix_within_gamma():
    m = make_sconv(12, 6, 1, gamma=0.08, seed=5)
    n = normalized_ecdm(m)
    worst = n.max(dim=0).values
    before = copy.deepcopy(m)
    report = dealloc(m)
    order = torch.argsort(worst, stable=True).tolist()
    k = len(report.closed)
    assert 0 < k < 12
    assert report.closed == sorted(order[:k])
    assert report.damage <= 0.08
    # Closing one more slot would exceed gamma.
    assert float(n[:, order[:k + 1]].sum(dim=1).max()) > 0.08
    assert m.closed_slots() == report.closed and all(int(m.source[i]) == -1 for i in report.closed)
    # Open slots and all weights are untouched.
    for name, t in before.state_dict().items():
        if name not in ("is_open", "source"):
            assert torch.equal(t, m.state_dict()[name]), name
    bound = (ecdm(before, dtype=torch.float64)[:, report.closed]).abs().sum(dim=1)
    torch.testing.assert_close(report.bound, bound)


def test_dealloc_change_is_the_closed_slots_contribution_and_within_its_bound():
    m = make_sconv(10, 6, 3, padding_mode="replicate", gamma=0.1, seed=7)
    x = gaussian_inputs(m, 32, 20, seed=8)
    before = copy.deepcopy(m)
    report = dealloc(m)
    assert report.closed
    with torch.no_grad():
        y0, y1 = before(x), m(x)
        closed = torch.zeros(10)
        closed[report.closed] = 1
        h = F.relu(before.bn(x)) * closed.view(1, -1, 1, 1)
        contribution = F.conv2d(F.pad(h, (1, 1, 1, 1), mode="replicate"), before.conv.weight)
    torch.testing.assert_close(y0 - y1, contribution, rtol=1e-4, atol=1e-5)
    mean_change = (y0 - y1).double().mean(dim=(0, 2, 3))
    tol = 0.02 * float(ecdm(before, dtype=torch.float64).abs().max())
    assert torch.all(mean_change.abs() <= report.bound + tol)
    torch.testing.assert_close(mean_change, report.expected_change, atol=tol, rtol=0)


def test_dealloc_mean_compensation_cancels_the_expected_change():
    m = make_sconv(10, 6, 1, gamma=0.15, seed=9)
    x = gaussian_inputs(m, 32, 20, seed=10)
    y0 = m(x).detach()
    report = dealloc(m, compensate=True)
    assert report.closed and report.compensated and m.conv.bias is not None
    assert torch.equal(report.expected_change, torch.zeros_like(report.expected_change))
    with torch.no_grad():
        uncompensated = F.conv2d(F.relu(m.bn(x)) * m.is_open.view(1, -1, 1, 1), m.conv.weight)
        drift_plain = (y0 - uncompensated).double().mean(dim=(0, 2, 3))
        drift_comp = (y0 - m(x)).double().mean(dim=(0, 2, 3))
    assert drift_plain.abs().max() > 0
    assert drift_comp.abs().max() < 0.2 * drift_plain.abs().max()


def test_dealloc_never_closes_the_last_slot():
    m = make_sconv(4, 3, 1)
    with torch.no_grad():
        m.conv.weight.zero_()  # every slot is harmless: ECDM is all zero
    report = dealloc(m)
    assert len(report.closed) == 3 and len(m.open_slots()) == 1


def test_realloc_is_exact_and_copies_top_k_sources():
    m = make_sconv(12, 6, 1, K=2, gamma=0.2, seed=11)
    dealloc(m)
    closed = m.closed_slots()
    assert closed
    score = normalized_ecdm(m).norm(dim=0)
    top = sorted(m.open_slots(), key=lambda s: -float(score[s]))[:2]
    x = torch.randn(3, 12, 8, 6)
    before = copy.deepcopy(m)
    y0 = m(x)
    report = realloc(m, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m(x), y0, rtol=0, atol=1e-6)
    assert sorted(slot for slot, _, _ in report.reallocated) == closed
    for slot, root, picked in report.reallocated:
        assert picked in top and root == picked
        assert int(m.source[slot]) == root and m.is_open[slot] == 1
        assert m.conv.weight[:, slot].abs().sum() == 0
        assert m.bn.weight[slot] == m.bn.weight[picked] and m.bn.running_var[slot] == m.bn.running_var[picked]
        assert m.shift[slot].abs().max() <= 1.5
    # Training mode (BN batch statistics) is preserved exactly too: the copies' columns are zero.
    torch.testing.assert_close(m.train()(x), before.train()(x), rtol=0, atol=1e-6)


def test_realloc_respects_n_max_and_k_zero():
    m = make_sconv(12, 6, 1, K=1, gamma=0.3, seed=12)
    m.n_max = 1
    dealloc(m)
    closed = m.closed_slots()
    assert len(closed) >= 2
    score = normalized_ecdm(m).norm(dim=0)
    ranked = sorted(m.open_slots(), key=lambda s: -float(score[s]))
    report = realloc(m)
    # A channel that reached n_max copies is no longer a candidate: the next best takes its place.
    assert [picked for _, _, picked in report.reallocated] == ranked[:len(closed)]
    assert len({root for _, root, _ in report.reallocated}) == len(closed) and not report.left_closed
    m.n_max = 1
    with torch.no_grad():
        m.is_open[:] = 0
        m.is_open[:2] = 1
        m.source[:] = -1
        m.source[1] = 0           # slot 1 already copies channel 0, the only other open slot
    report = realloc(m)
    assert report.reallocated == [] and report.left_closed == list(range(2, 12))
    pruner = make_sconv(12, 6, 3, gamma=0.3, seed=12)
    dealloc(pruner)
    assert realloc(pruner).reallocated == [] and pruner.closed_slots()


def test_realloc_points_copies_of_copies_at_the_root_channel():
    m = make_sconv(6, 4, 1, K=1)
    with torch.no_grad():
        m.source[1] = 4          # slot 1 is a copy of channel 4
        m.conv.weight.zero_()
        m.conv.weight[:, 1] = 3.0  # ... and the only important slot
        m.is_open[5] = 0
    report = realloc(m)
    assert report.reallocated == [(5, 4, 1)]
    assert int(m.source[5]) == 4


def test_dealloc_and_realloc_need_selective_convs():
    with pytest.raises(ValueError, match="insert_selective_conv"):
        dealloc(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(TypeError, match="SelectiveConv2d"):
        ecdm(nn.Conv2d(3, 3, 1))


# ------------------------------------------------------------------------------------------------
# insertion

@pytest.mark.parametrize("relu", ["module", "module_inplace", "functional", "functional_inplace", "torch",
                                  "torch_inplace", "method", "method_inplace"])
@pytest.mark.parametrize("dropout", [None, "module", "functional"])
def test_insertion_matches_every_spelling(relu, dropout):
    model = randomized(PreAct(relu, dropout, k=3))
    x = torch.randn(2, 6, 5, 5)
    gm = graphsel.transform(model, ["insert_selective_conv"], x)
    mods = selective_modules(gm)
    assert [p for p, _ in mods] == ["conv"]
    m = mods[0][1]
    assert (m.dropout is not None) == (dropout is not None)
    if dropout == "functional":
        assert isinstance(m.dropout, nn.Dropout) and m.dropout.p == 0.25
    assert not any(isinstance(v, nn.BatchNorm2d) for k, v in gm.named_children())
    torch.testing.assert_close(gm(x), model(x))


def test_insertion_on_a_training_mode_model_keeps_train_mode_and_dropout():
    model = randomized(PreAct("module", "module")).train()
    gm = graphsel.transform(model, ["insert_selective_conv"], torch.randn(2, 6, 5, 5))
    m = selective_modules(gm)[0][1]
    assert gm.training and m.training and m.dropout.training


def test_insertion_options_K_gamma_n_max_include_exclude():
    model = nn.Sequential(randomized(PreAct(k=1)), randomized(PreAct(cin=4, cout=4, k=3)))
    x = torch.randn(2, 6, 5, 5)
    gm = graphsel.transform(model, [("insert_selective_conv", {"gamma": 0.01, "n_max": 2})], x)
    ks = {p: m.K for p, m in selective_modules(gm)}
    assert ks == {"0.conv": 3, "1.conv": 0}
    assert all(m.gamma == 0.01 and m.n_max == 2 for _, m in selective_modules(gm))
    gm = graphsel.transform(model, [("insert_selective_conv", {"K": 1, "include": "1.*"})], x)
    assert {p: m.K for p, m in selective_modules(gm)} == {"1.conv": 1}
    record = graphsel.graphsel_meta(gm).history[-1]
    assert any(d.where == "0.conv" and "include" in d.message for d in record.diagnostics)
    gm = graphsel.transform(model, [("insert_selective_conv", {"exclude": lambda path, conv: conv.kernel_size == (3, 3)})], x)
    assert [p for p, _ in selective_modules(gm)] == ["0.conv"]


def test_pattern_absent_is_a_reported_no_op():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    gm = graphsel.transform(model.eval(), ["insert_selective_conv"], torch.randn(1, 3, 8, 8))
    record = graphsel.graphsel_meta(gm).history[-1]
    assert not record.modified and record.stats["inserted"] == 0
    assert any(d.level == "info" and "no-op" in d.message for d in record.diagnostics)
    assert any(d.where == "0" and "placeholder" in d.message for d in record.diagnostics)


def test_grouped_conv_is_skipped_with_a_reason():
    model = randomized(PreAct(cin=6, cout=6, groups=3))
    gm = graphsel.transform(model, ["insert_selective_conv"], torch.randn(2, 6, 5, 5))
    record = graphsel.graphsel_meta(gm).history[-1]
    assert not selective_modules(gm)
    assert any(d.where == "conv" and "groups=3" in d.message for d in record.diagnostics)


def test_conv_with_bias_is_supported_and_compensation_adds_to_it():
    model = randomized(PreAct(bias=True))
    x = torch.randn(2, 6, 5, 5)
    gm = graphsel.transform(model, ["insert_selective_conv"], x)
    m = selective_modules(gm)[0][1]
    torch.testing.assert_close(gm(x), model(x))
    bias = m.conv.bias.detach().clone()
    expected = ecdm(m, dtype=torch.float64)
    report = dealloc(m, compensate=True, gamma=0.3)
    assert report.closed
    torch.testing.assert_close(m.conv.bias.detach().double() - bias.double(),
                               expected[:, report.closed].sum(dim=1), rtol=1e-6, atol=1e-6)
    low = graphsel.transform(gm, ["lower_selective_conv"])
    torch.testing.assert_close(low(x), gm(x))


class SharedBN(nn.Module):
    """The BN output feeds the ReLU → conv chain and a second branch."""

    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1, bias=False)

    def forward(self, x):
        y = self.bn(x)
        return self.conv(F.relu(y)) + y


class TwiceCalledBN(nn.Module):
    """The same BN module normalises two branches."""

    def __init__(self):
        super().__init__()
        self.bn, self.a, self.b = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.a(F.relu(self.bn(x))) + self.b(F.relu(self.bn(x * 2)))


class ReluFanOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = F.relu(self.bn(x))
        return self.conv(h) + h


@pytest.mark.parametrize("model_cls,where,reason", [
    (SharedBN, "conv", "BatchNorm output also feeds"),
    (TwiceCalledBN, "a", "called at 2 places"),
    (ReluFanOut, "conv", "ReLU output also feeds"),
])
def test_bn_shared_by_two_branches_is_skipped(model_cls, where, reason):
    model = randomized(model_cls())
    gm = graphsel.transform(model, ["insert_selective_conv"], torch.randn(2, 4, 5, 5))
    record = graphsel.graphsel_meta(gm).history[-1]
    assert not selective_modules(gm) and not record.modified
    assert any(d.where == where and reason in d.message for d in record.diagnostics), record.diagnostics


@pytest.mark.parametrize("options,error,match", [
    ({"gamma": 0.0}, ValueError, "gamma"), ({"gamma": -1e-3}, ValueError, "gamma"), ({"gamma": 1.0}, ValueError, "gamma"),
    ({"K": -1}, ValueError, "K"), ({"K": 1.5}, TypeError, "K"), ({"n_max": 0}, ValueError, "n_max"),
    ({"include": 3}, TypeError, "include"),
])
def test_bad_options_raise_clear_errors(options, error, match):
    with pytest.raises(error, match=match):
        InsertSelectiveConv(**options)
    with pytest.raises(error, match=match):
        graphsel.transform(PreAct(), [("insert_selective_conv", options)], torch.randn(1, 6, 4, 4))


# ------------------------------------------------------------------------------------------------
# lowering

def test_lowering_is_exact_records_consumer_masks_and_removes_every_selective_conv():
    model = nn.Sequential(randomized(PreAct(k=1, cin=8, cout=6)), randomized(PreAct(cin=6, cout=5, k=3, dropout="module")))
    x = torch.randn(2, 8, 7, 5)
    gm = graphsel.transform(model, ["insert_selective_conv"], x)
    randomize_state(gm, torch.Generator().manual_seed(3), p_closed=0.3, p_copy=0.5)
    states = {p: (m.is_open.clone(), m.source.clone()) for p, m in selective_modules(gm)}
    low = run_pass(LowerSelectiveConv(), gm)
    assert not selective_modules(low)
    torch.testing.assert_close(low(x), gm(x))
    masks = get_masks(low).consumer
    for path, (is_open, source) in states.items():
        expected = {i for i in range(len(is_open)) if not (is_open[i] > 0 and source[i] < 0)}
        assert masks.get(path, set()) == expected
        conv = low.get_submodule(path)
        assert isinstance(conv, nn.Conv2d) and conv.in_channels == len(is_open) + int(((source >= 0) & (is_open > 0)).sum())
        assert conv.weight[:, sorted(expected)].abs().sum() == 0
    # The same through the verified pipeline (the oracle applies the masks).
    graphsel.transform(gm, ["lower_selective_conv"])


def test_lowering_of_a_fresh_model_is_the_original_chain():
    model = randomized(PreAct(k=3, dropout="module"))
    x = torch.randn(2, 6, 5, 5)
    gm = graphsel.transform(model, ["insert_selective_conv", "lower_selective_conv"], x)
    names = {type(m).__name__ for m in gm.modules()}
    assert {"BatchNorm2d", "Conv2d", "Dropout2d"} <= names and "SelectiveConv2d" not in names
    assert dict(gm.named_modules()).keys() >= {"bn", "conv", "drop"}  # original paths
    assert not get_masks(gm)
    torch.testing.assert_close(gm(x), model(x))


def test_lowering_without_selective_convs_is_a_reported_no_op():
    gm = graphsel.transform(nn.Sequential(nn.Conv2d(3, 3, 1)), ["lower_selective_conv"], torch.randn(1, 3, 4, 4))
    record = graphsel.graphsel_meta(gm).history[-1]
    assert not record.modified and any("no-op" in d.message for d in record.diagnostics)


def test_export_round_trip_through_fold_masks_and_materialize_is_exact_and_smaller():
    model = nn.Sequential(randomized(PreAct(k=1, cin=8, cout=6)), randomized(PreAct(cin=6, cout=5, k=3)))
    x = torch.randn(2, 8, 7, 5)
    gm = graphsel.transform(model, ["insert_selective_conv"], x)
    m0, m1 = (m for _, m in selective_modules(gm))
    dealloc(gm, gamma=0.2)
    realloc(gm, generator=torch.Generator().manual_seed(0))
    assert m1.closed_slots() and not m0.closed_slots() and m0.replica_slots()
    slim = graphsel.transform(gm, ["lower_selective_conv", "fold_masks", "materialize"])
    assert not selective_modules(slim)
    torch.testing.assert_close(slim(x), gm(x))
    convs = {p: m for p, m in slim.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    assert convs["1.conv"].in_channels == 6 - len(m1.closed_slots())
    assert convs["0.conv"].out_channels == 6 - len(m1.closed_slots())  # producer filters nobody reads are gone
    plain = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in slim.parameters()) < plain


# ------------------------------------------------------------------------------------------------
# cost

def test_cost_counts_the_selective_conv_like_its_conv():
    model = randomized(PreAct(k=3))
    x = torch.randn(1, 6, 8, 8)
    plain = graphsel.cost(model, x)
    gm = graphsel.transform(model, ["insert_selective_conv"], x)
    assert graphsel.cost(gm).macs == plain.macs


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_batchnorm_variants_insert_and_lower_exactly(affine, track):
    model = PreAct(k=1, cin=6, cout=4)
    model.bn = nn.BatchNorm2d(6, affine=affine, track_running_stats=track)
    if track:
        fresh = random_bn(6, torch.Generator().manual_seed(2))
        model.bn.running_mean.copy_(fresh.running_mean)
        model.bn.running_var.copy_(fresh.running_var)
    model.eval()
    x = torch.randn(3, 6, 5, 7)
    gm = graphsel.transform(model, ["insert_selective_conv"], x)
    randomize_state(gm, torch.Generator().manual_seed(1), p_closed=0.3, p_copy=0.5)
    assert selective_modules(gm)[0][1].replica_slots()
    low = run_pass(LowerSelectiveConv(), gm)
    torch.testing.assert_close(low(x), gm(x))
    assert float(expected_activation(gm.get_submodule("conv").bn).min()) >= 0
