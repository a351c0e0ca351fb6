"""Training integration of selective convolution: the schedule, optimizer groups and state, a few real
SGD steps on a DenseNet with dealloc/realloc, state_dict save/load, torch.compile, and the export of
the trained model."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphsel
from graphsel.tools.models import densenet_cifar
from graphsel.passes.selective_conv import (SelectiveConv2d, SelectiveSchedule, allocation, dealloc, param_groups,
                                            randomize_state, realloc, selective_modules)


def small_densenet_gm(seed: int = 0):
    torch.manual_seed(seed)
    model = densenet_cifar(16, growth_rate=6, in_channels=1).eval()
    x = torch.randn(4, 1, 12, 12)
    return model, x, graphsel.transform(model, ["insert_selective_conv"], x)


def train_steps(gm, opt, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gm.train()
    for _ in range(steps):
        x = torch.randn(8, 1, 12, 12, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        opt.step()
    gm.eval()


def test_param_groups_put_shifts_at_their_own_weight_decay():
    _, _, gm = small_densenet_gm()
    groups = param_groups(gm)
    shifts = {id(m.shift) for _, m in selective_modules(gm)}
    assert [g["weight_decay"] for g in groups] == [1e-4, 1e-5]
    assert {id(p) for p in groups[1]["params"]} == shifts
    assert not shifts & {id(p) for p in groups[0]["params"]}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(gm.parameters()))
    assert len(param_groups(nn.Conv2d(2, 2, 1))) == 1


def test_schedule_runs_dealloc_realloc_in_the_first_half_only():
    _, _, gm = small_densenet_gm()
    sched = SelectiveSchedule(gm, epochs=5)
    assert [sched.active(e) for e in range(5)] == [True, True, True, False, False]
    for e in range(5):
        record = sched.on_epoch_end(e)
        assert (record is not None) == (e < 3)
    assert len(sched.history) == 3
    assert {layer.path for layer in sched.history[0].layers} == {p for p, _ in selective_modules(gm)}
    with pytest.raises(ValueError, match="insert_selective_conv"):
        SelectiveSchedule(nn.Conv2d(2, 2, 1), 3)
    with pytest.raises(ValueError, match="epochs"):
        SelectiveSchedule(gm, 0)


def test_training_with_the_schedule_reallocates_1x1_and_prunes_3x3_slots():
    _, x, gm = small_densenet_gm()
    for _, m in selective_modules(gm):
        m.gamma = 0.05  # a few steps of training do not make channels negligible at the paper's 1e-3
    opt = torch.optim.SGD(param_groups(gm), lr=0.05, momentum=0.9, nesterov=True)
    sched = SelectiveSchedule(gm, epochs=4, optimizer=opt)
    for epoch in range(4):
        train_steps(gm, opt, 3, seed=epoch)
        record = sched.on_epoch_end(epoch)
        if record is not None:
            assert record.deallocated > 0
    layers = {a.path: a for a in allocation(gm)}
    one_by_one = [p for p, m in selective_modules(gm) if m.K > 0]
    three_by_three = [p for p, m in selective_modules(gm) if m.K == 0]
    assert sum(layers[p].copies for p in one_by_one) > 0
    assert all(layers[p].closed == 0 for p in one_by_one)      # K > 0 layers re-distribute
    assert any(layers[p].closed > 0 for p in three_by_three)   # K = 0 layers prune
    assert sum(t["deallocated"] for t in sched.totals.values()) == sum(r.deallocated for r in sched.history)


def test_schedule_resets_optimizer_state_of_reallocated_slots():
    _, _, gm = small_densenet_gm()
    for _, m in selective_modules(gm):
        m.gamma = 0.05
    opt = torch.optim.SGD(param_groups(gm), lr=0.05, momentum=0.9)
    train_steps(gm, opt, 2)
    sched = SelectiveSchedule(gm, epochs=2, optimizer=opt)
    record = sched.on_epoch_end(0)
    assert record.reallocated > 0
    for layer in record.layers:
        m = gm.get_submodule(layer.path)
        if layer.reallocated == 0:
            continue
        new = m.replica_slots()
        buf = opt.state[m.conv.weight]["momentum_buffer"]
        assert buf[:, new].abs().sum() == 0
        assert opt.state[m.bn.weight]["momentum_buffer"][new].abs().sum() == 0


def test_schedule_with_compensation_registers_new_biases_with_the_optimizer():
    _, x, gm = small_densenet_gm()
    opt = torch.optim.SGD(param_groups(gm), lr=0.01, momentum=0.9)
    n_before = sum(len(g["params"]) for g in opt.param_groups)
    SelectiveSchedule(gm, epochs=2, compensate=True, optimizer=opt)
    biases = [m.conv.bias for _, m in selective_modules(gm)]
    assert all(b is not None for b in biases)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(b) in in_opt for b in biases)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_before + len(biases)


def test_trained_state_survives_save_and_load_and_exports_exactly():
    model, x, gm = small_densenet_gm()
    for _, m in selective_modules(gm):
        m.gamma = 0.05
    opt = torch.optim.SGD(param_groups(gm), lr=0.05, momentum=0.9, nesterov=True)
    sched = SelectiveSchedule(gm, epochs=2, compensate=True, optimizer=opt)
    train_steps(gm, opt, 3)
    sched.on_epoch_end(0)
    train_steps(gm, opt, 2, seed=5)
    buf = io.BytesIO()
    torch.save({"model": gm.state_dict(), "schedule": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    _, _, fresh = small_densenet_gm()
    fresh.load_state_dict(saved["model"])
    torch.testing.assert_close(fresh(x), gm(x), rtol=0, atol=0)
    sched2 = SelectiveSchedule(fresh, epochs=2)
    sched2.load_state_dict(saved["schedule"])
    assert sched2.totals == sched.totals
    slim = graphsel.transform(gm, ["lower_selective_conv", "fold_masks", "materialize"])
    assert not any(isinstance(m, SelectiveConv2d) for m in slim.modules())
    torch.testing.assert_close(slim(x), gm(x), rtol=1e-4, atol=1e-5)
    assert graphsel.cost(slim).macs < graphsel.cost(model, x).macs


@pytest.mark.parametrize("backend", ["eager", pytest.param("aot_eager", marks=pytest.mark.slow)])
def test_torch_compile_follows_state_changes(backend):
    """Dynamo guards on the module's slot caches: every dealloc/realloc (or load) recompiles the
    affected frames instead of running a stale graph. (Inductor behaves the same; it is checked by
    benchmarks/sconv_fashion_mnist.py --compile because compiling takes minutes on CPU.)"""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(4, 1, 12, 12)
    gm = graphsel.transform(densenet_cifar(10, growth_rate=4, in_channels=1).eval(), ["insert_selective_conv"], x)
    compiled = torch.compile(gm, backend=backend)
    torch.testing.assert_close(compiled(x), gm(x))
    randomize_state(gm, torch.Generator().manual_seed(1))  # dealloc/realloc-like edits of the buffers
    torch.testing.assert_close(compiled(x), gm(x))
    dealloc(gm, gamma=0.2)
    realloc(gm)
    torch.testing.assert_close(compiled(x), gm(x))
    gm.train()
    compiled(torch.randn(8, 1, 12, 12)).sum().backward()
    assert any(m.shift.grad is not None and m.shift.grad.abs().sum() > 0 for _, m in selective_modules(gm))


# ------------------------------------------------------------------------------------------------
# the ablations of the schedule (dealloc only, frozen shifts) and slot churn

def _gamma(gm, value: float) -> None:
    for _, m in selective_modules(gm):
        m.gamma = value


def test_dealloc_only_never_reallocates_so_1x1_layers_prune_too():
    _, _, gm = small_densenet_gm()
    _gamma(gm, 0.05)
    opt = torch.optim.SGD(param_groups(gm), lr=0.05, momentum=0.9, nesterov=True)
    sched = SelectiveSchedule(gm, epochs=4, optimizer=opt, realloc=False)
    assert sched.variant == "dealloc_only" and SelectiveSchedule(gm, 4).variant == "full"
    for epoch in range(4):
        train_steps(gm, opt, 3, seed=epoch)
        sched.on_epoch_end(epoch)
    assert sum(r.deallocated for r in sched.history) > 0
    assert all(r.reallocated == 0 and r.recycled == 0 for r in sched.history)
    layers = {a.path: a for a in allocation(gm)}
    assert all(a.copies == 0 for a in layers.values())
    one_by_one = [p for p, m in selective_modules(gm) if m.K > 0]
    assert any(layers[p].closed > 0 for p in one_by_one)     # with realloc these would re-open


def test_frozen_shifts_get_no_gradient_and_keep_their_draw():
    _, _, gm = small_densenet_gm()
    _gamma(gm, 0.05)
    opt = torch.optim.SGD(param_groups(gm), lr=0.05, momentum=0.9, nesterov=True)   # built before: shifts in it
    sched = SelectiveSchedule(gm, epochs=2, optimizer=opt, train_shifts=False)
    assert sched.variant == "shifts_frozen"
    assert all(not m.shift.requires_grad for _, m in selective_modules(gm))
    assert len(param_groups(gm)) == 1                          # a later optimizer leaves them out
    train_steps(gm, opt, 2)
    record = sched.on_epoch_end(0)
    assert record.reallocated > 0
    drawn = {p: m.shift.detach().clone() for p, m in selective_modules(gm)}
    copies = [(p, m.replica_slots()) for p, m in selective_modules(gm) if m.replica_slots()]
    assert any(drawn[p][slots].abs().sum() > 0 for p, slots in copies)        # U(−1.5, 1.5)² draws
    train_steps(gm, opt, 3, seed=1)
    for p, m in selective_modules(gm):
        assert m.shift.grad is None and torch.equal(m.shift.detach(), drawn[p])
    # the default trains them
    _, _, gm2 = small_densenet_gm()
    _gamma(gm2, 0.05)
    opt2 = torch.optim.SGD(param_groups(gm2), lr=0.05, momentum=0.9, nesterov=True)
    sched2 = SelectiveSchedule(gm2, epochs=2, optimizer=opt2)
    train_steps(gm2, opt2, 2)
    sched2.on_epoch_end(0)
    before = {p: m.shift.detach().clone() for p, m in selective_modules(gm2)}
    train_steps(gm2, opt2, 3, seed=1)
    assert any(not torch.equal(m.shift.detach(), before[p]) for p, m in selective_modules(gm2))


def test_schedule_counts_copies_closed_again_as_recycled():
    """A fresh copy has zeroed conv columns, so its expected damage is 0: a second call before any
    training closes it again (and re-allocates it) — the churn the benchmarks report."""
    _, _, gm = small_densenet_gm()
    _gamma(gm, 0.05)
    opt = torch.optim.SGD(param_groups(gm), lr=0.05, momentum=0.9)
    train_steps(gm, opt, 2)
    sched = SelectiveSchedule(gm, epochs=4)
    first = sched.on_epoch_end(0)
    assert first.reallocated > 0 and first.recycled == 0
    copies = {layer.path: set(gm.get_submodule(layer.path).replica_slots()) for layer in first.layers}
    second = sched.on_epoch_end(1)
    assert second.recycled > 0
    for layer in second.layers:
        assert layer.recycled <= min(layer.deallocated, len(copies[layer.path]))
    assert sum(t["recycled"] for t in sched.totals.values()) == second.recycled
    state = sched.state_dict()
    state["totals"] = {p: {k: v for k, v in t.items() if k != "recycled"} for p, t in state["totals"].items()}
    old = SelectiveSchedule(gm, epochs=4)
    old.load_state_dict(state)                    # a schedule saved before churn was counted
    assert all(t["recycled"] == 0 for t in old.totals.values())
    assert old.on_epoch_end(1) is not None
