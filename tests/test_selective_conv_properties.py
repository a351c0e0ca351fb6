"""Properties of selective convolution over random architectures (tests/strategies.py):

* insertion is exact, and every pre-activation unit's conv becomes selective;
* realloc is exact (eval and training mode);
* dealloc changes each layer's output by exactly the closed slots' contribution (open slots
  untouched), and closes no more than its threshold allows;
* the lowering of a random-state model (closed slots, copies, fractional shifts) is exact and
  records the consumer masks, and the full export (lower → fold_masks → materialize) is exact;
* the state survives ``state_dict`` save/load into a freshly inserted model.
"""
from __future__ import annotations

import copy
import io

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

import graphsel
from graphsel.analysis.masks import get_masks
from graphsel.passes.selective_conv import (LowerSelectiveConv, SelectiveConv2d, dealloc, normalized_ecdm,
                                            randomize_state, realloc, selective_modules)
from graphsel.ir.shapes import propagate_shapes
from graphsel.ir.tracing import example_inputs_of
from strategies import PreActUnitModule, assert_same_function, conv_nets_with_bn_relu_conv


def _insert(arch):
    model = arch.build()
    x = arch.example_inputs()
    return model, x, graphsel.transform(model, ["insert_selective_conv"], x)


def _layer_inputs(gm, x) -> dict[str, torch.Tensor]:
    got = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, p=p: got.__setitem__(p, inp[0].detach()))
             for p, m in selective_modules(gm)]
    try:
        with torch.no_grad():
            gm.eval()(*x)
    finally:
        for h in hooks:
            h.remove()
    return got


@settings(max_examples=30)
@given(conv_nets_with_bn_relu_conv())
def test_insertion_is_exact_and_covers_every_preact_unit(arch):
    model, x, gm = _insert(arch)
    assert_same_function(model, gm, x)
    assert_same_function(model, gm, arch.example_inputs(seed=arch.seed + 1))
    expected = {p + ".conv" for p, m in model.named_modules() if isinstance(m, PreActUnitModule)}
    assert expected and expected <= {p for p, _ in selective_modules(gm)}
    assert not any(isinstance(m, nn.BatchNorm2d) and p in expected for p, m in gm.named_modules())


@settings(max_examples=20)
@given(conv_nets_with_bn_relu_conv(), st.integers(0, 2**16), st.sampled_from([0.05, 0.2, 0.5]))
def test_realloc_is_exact(arch, seed, gamma):
    _, x, gm = _insert(arch)
    for _, m in selective_modules(gm):
        m.K = max(m.K, 1)
    randomize_state(gm, torch.Generator().manual_seed(seed), p_closed=0.2, p_copy=0.3)
    dealloc(gm, gamma=gamma)
    before = copy.deepcopy(gm)
    reports = realloc(gm, generator=torch.Generator().manual_seed(seed))
    assert sum(len(r.reallocated) for r in reports.values()) == sum(
        len(m.closed_slots()) for _, m in selective_modules(before))
    assert all(not m.closed_slots() for _, m in selective_modules(gm))
    assert_same_function(before, gm, x, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # training mode (BN batch statistics; the same dropout draws) too
        torch.manual_seed(seed)
        y_after = gm.train()(*x)
        torch.manual_seed(seed)
        y_before = before.train()(*x)
    torch.testing.assert_close(y_after, y_before, rtol=1e-5, atol=1e-6)


@settings(max_examples=20)
@given(conv_nets_with_bn_relu_conv(), st.sampled_from([0.02, 0.1, 0.3]), st.booleans())
def test_dealloc_removes_exactly_the_closed_slots_contribution(arch, gamma, compensate):
    _, x, gm = _insert(arch)
    inputs = _layer_inputs(gm, x)
    before = copy.deepcopy(gm)
    normalized = {p: normalized_ecdm(m) for p, m in selective_modules(gm)}
    # at least the smallest single-slot damage of some layer with two open slots: every draw closes one
    cheapest = min((float(n.max(dim=0).values.min()) for p, n in normalized.items()
                    if len(gm.get_submodule(p).open_slots()) >= 2 and n.shape[0]), default=None)
    assume(cheapest is not None)
    gamma = max(gamma, cheapest)
    reports = dealloc(gm, compensate=compensate, gamma=gamma)
    closed = sum(len(r.closed) for r in reports.values())
    event(f"slots closed: {min(closed, 10)}{'+' if closed >= 10 else ''}")
    assert closed >= 1
    for path, m in selective_modules(gm):
        old = before.get_submodule(path)
        r = reports[path]
        assert r.damage <= gamma and len(m.open_slots()) >= 1
        if r.closed:
            assert float(normalized[path][:, r.closed].sum(dim=1).max()) <= gamma + 1e-12
        open_now = m.open_slots()
        assert set(open_now) | set(r.closed) == set(old.open_slots())
        assert torch.equal(m.source[open_now], old.source[open_now]) and torch.equal(m.shift, old.shift)
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(m.bn, name), getattr(old.bn, name))
        assert torch.equal(m.conv.weight, old.conv.weight)
        # Per layer, on the layer's real input: the output moved by the closed slots' contribution
        # (plus, with compensation, the constant added to the bias).
        with torch.no_grad():
            xin = inputs[path]
            closed = torch.zeros(m.in_channels)
            closed[r.closed] = 1
            conv = copy.deepcopy(old.conv)
            conv.bias = None
            h = F.relu(old.bn(xin)) * closed.view(1, -1, 1, 1)
            contribution = conv(h)
            change = old(xin) - m(xin)
            if compensate and r.closed:
                shift = (m.conv.bias - (old.conv.bias if old.conv.bias is not None else 0)).view(1, -1, 1, 1)
                contribution = contribution - shift
        torch.testing.assert_close(change, contribution, rtol=1e-4, atol=1e-5)


@settings(max_examples=25)
@given(conv_nets_with_bn_relu_conv(), st.integers(0, 2**16), st.booleans())
def test_lowering_a_random_state_is_exact_and_records_consumer_masks(arch, seed, integer_shifts):
    _, x, gm = _insert(arch)
    randomize_state(gm, torch.Generator().manual_seed(seed), p_closed=0.3, p_copy=0.4,
                    integer_shifts=integer_shifts)
    states = {p: (m.is_open.clone(), m.source.clone()) for p, m in selective_modules(gm)}
    low = LowerSelectiveConv()(copy.deepcopy(gm)).gm
    propagate_shapes(low, example_inputs_of(gm))
    assert not any(isinstance(m, SelectiveConv2d) for m in low.modules())
    assert_same_function(gm, low, x)
    assert_same_function(gm, low, arch.example_inputs(seed=arch.seed + 1))
    masks = get_masks(low).consumer
    for path, (is_open, source) in states.items():
        expected = {i for i in range(len(is_open)) if not (is_open[i] > 0 and source[i] < 0)}
        assert masks.get(path, set()) == expected
        assert low.get_submodule(path).weight[:, sorted(expected)].abs().sum() == 0


@settings(max_examples=10)
@given(conv_nets_with_bn_relu_conv(), st.integers(0, 2**16))
def test_full_export_of_a_random_state_is_exact(arch, seed):
    _, x, gm = _insert(arch)
    randomize_state(gm, torch.Generator().manual_seed(seed), p_closed=0.3, p_copy=0.3)
    slim = graphsel.transform(gm, ["lower_selective_conv", "fold_masks", "materialize"])
    assert not any(isinstance(m, SelectiveConv2d) for m in slim.modules())
    assert_same_function(gm, slim, x)


@settings(max_examples=15)
@given(conv_nets_with_bn_relu_conv(), st.integers(0, 2**16))
def test_state_dict_round_trip(arch, seed):
    _, x, gm = _insert(arch)
    randomize_state(gm, torch.Generator().manual_seed(seed), p_closed=0.3, p_copy=0.4)
    dealloc(gm, compensate=True, gamma=0.05)  # may create conv biases the fresh model lacks
    buf = io.BytesIO()
    torch.save(gm.state_dict(), buf)
    buf.seek(0)
    _, _, fresh = _insert(arch)
    fresh.load_state_dict(torch.load(buf))
    assert_same_function(gm, fresh, x, rtol=0, atol=0)
    for (p, a), (_, b) in zip(selective_modules(gm), selective_modules(fresh)):
        assert torch.equal(a.is_open, b.is_open) and torch.equal(a.source, b.source) and torch.equal(a.shift, b.shift)
        assert a.replica_slots() == b.replica_slots()
