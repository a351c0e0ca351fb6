"""Budgeted super networks (passes/bsn): gates on residual branches, blocks and module paths;
exactness of insertion, of gates turned off (against the model with those branches replaced by
zero, built independently of graphsel) and of extraction; cost tables against hand counts
(BSN's ResNet-110: 2.54e8 MACs, 1.73 M parameters); the distributed computation cost on hand-made
DAGs and the paper's fig. 8; the fabrics; the REINFORCE helper; bad input. ``-m zoo``: torchvision
and timm models."""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphsel
import graphsel.passes.bsn as bsn
from graphsel.analysis.cost import CostError, distributed_cost
from graphsel.errors import GraphselError
from graphsel.ir.meta import graphsel_meta
from graphsel.tools.models import resnet_cifar

from strategies import ResidualModule, architectures


def _gate(gm, prefix):
    return [n for n, _ in bsn.gates(gm) if n.startswith(prefix)]


def _out(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _no_logits(model):
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith(".logit"))


# ------------------------------------------------------------------------------------------------
# the gate

def test_gate_samples_per_sample_in_training_and_thresholds_in_eval():
    g = bsn.Gate()
    assert g.logit.shape == () and float(g.logit.detach()) == 3.0 and g.is_on
    x = torch.ones(4000, 3)
    g.train()
    torch.manual_seed(0)
    y = g(x)
    kept = y[:, 0]
    assert set(kept.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(y, x * g.last_h[:, None].float())                 # one draw per sample
    assert abs(kept.mean().item() - torch.sigmoid(torch.tensor(3.0)).item()) < 0.02
    g.eval()
    assert torch.equal(g(x), x)
    with torch.no_grad():
        g.logit.fill_(-0.1)
    assert torch.equal(g(x), torch.zeros_like(x)) and not g.is_on
    g.train()
    g.sampling = False                                                     # warm-up: every edge on
    assert torch.equal(g(x), x)
    with pytest.raises(TypeError):
        bsn.Gate(float("nan"))


# ------------------------------------------------------------------------------------------------
# insertion, gates off, extraction: exact on generated residual networks

class _ZeroBody(nn.Module):
    """The residual function replaced by zero (same shape): the reference, without graphsel."""

    def __init__(self, units):
        super().__init__()
        self.units = units

    def forward(self, x):
        for u in self.units:
            x = u(x)
        return torch.zeros_like(x)


def _zeroed(model, blocks):
    ref = copy.deepcopy(model)
    for i in blocks:
        blk = ref.features[i]
        blk.body = nn.ModuleList([_ZeroBody(blk.body)])
    return ref


@settings(max_examples=12, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(("residual", "conv", "pool"), required=("residual",), max_blocks=4),
       data=st.data())
def test_gates_insertion_off_and_extraction_are_exact(arch, data):
    model = arch.build()
    (x,) = arch.example_inputs()
    residual = [i for i, m in enumerate(model.features) if isinstance(m, ResidualModule)]
    gm = graphsel.transform(model, ["budget_gates"], x)          # verified exact in the pipeline
    names = [n for n, _ in bsn.gates(gm)]
    assert names == [f"bsn_gates.features_{i}" for i in residual]
    torch.testing.assert_close(_out(gm, x), _out(model, x), rtol=0, atol=0)
    off = data.draw(st.lists(st.sampled_from(residual), unique=True), label="off")
    bsn.set_gates(gm, [f"bsn_gates.features_{i}" for i in off])
    ref = _zeroed(model, off)
    torch.testing.assert_close(_out(gm, x), _out(ref, x), rtol=1e-5, atol=1e-5)
    slim = graphsel.transform(gm, ["bsn_extract"], x)            # verified against gm in eval
    torch.testing.assert_close(_out(slim, x), _out(ref, x), rtol=1e-5, atol=1e-5)
    removed = sum(_params(model.features[i].body) for i in off)   # the branch's own; shortcuts stay
    assert _params(slim) == _params(model) - removed
    assert not bsn.gates(slim)
    cm = bsn.ArchitectureCost(gm)
    assert cm.eval_cost("params") == _params(slim)
    assert cm.eval_cost("macs") == bsn.ArchitectureCost(slim).eval_cost("macs")


@settings(max_examples=8, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(required=("residual",), max_blocks=4), on=st.sampled_from(["residual", "blocks"]),
       data=st.data())
def test_any_architecture_extraction_is_exact_and_costs_agree(arch, on, data):
    """Every construct of the strategies (dense concat, SE, shuffles, splits, ConvNeXt-style
    blocks, ...) next to a residual block: insertion and extraction verified by the pipeline, and
    the cost model's eval architecture is the extracted network's cost."""
    model = arch.build()
    (x,) = arch.example_inputs()
    gm = graphsel.transform(model, [("budget_gates", {"on": on})], x)
    names = [n for n, _ in bsn.gates(gm)]
    if on == "residual":
        assert len(names) >= sum(isinstance(m, ResidualModule) for m in model.features)
    if not names:
        return
    bsn.set_gates(gm, data.draw(st.lists(st.sampled_from(names), unique=True), label="off"))
    cm = bsn.ArchitectureCost(gm, units=2)
    slim = graphsel.transform(gm, ["bsn_extract"], x)
    sc = bsn.ArchitectureCost(slim, units=2)
    for kind in ("macs", "params", "steps"):
        assert cm.eval_cost(kind) == sc.eval_cost(kind)
    assert sc.eval_cost("params") == _params(slim)


def test_torchvision_resnet18_gates_off_and_projection_shortcut_kept():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = graphsel.transform(model, ["budget_gates"], x)
    assert [n for n, _ in bsn.gates(gm)] == [f"bsn_gates.layer{s}_{b}" for s in range(1, 5) for b in range(2)]
    off = ["bsn_gates.layer2_0", "bsn_gates.layer3_1"]               # layer2.0 has a projection shortcut
    bsn.set_gates(gm, off)
    ref = copy.deepcopy(model)
    for path in ("layer2.0", "layer3.1"):
        blk = ref.get_submodule(path)
        blk.bn2.forward = lambda t, _bn=blk.bn2: torch.zeros_like(nn.BatchNorm2d.forward(_bn, t))
    torch.testing.assert_close(_out(gm, x), _out(ref, x), rtol=1e-5, atol=1e-5)
    slim = graphsel.transform(gm, ["bsn_extract"], x)
    torch.testing.assert_close(_out(slim, x), _out(ref, x), rtol=1e-5, atol=1e-5)
    names = {n for n, _ in slim.named_parameters()}
    assert "layer2.0.downsample.0.weight" in names and "layer2.0.downsample.1.weight" in names
    assert not any(n.startswith(("layer2.0.conv", "layer2.0.bn", "layer3.1.")) for n in names)
    gone = sum(p.numel() for n, p in model.named_parameters()
               if n.startswith(("layer2.0.conv", "layer2.0.bn", "layer3.1.")))
    assert _params(slim) == _params(model) - gone
    stats = graphsel_meta(slim).history[-1].stats
    assert stats["off"] == 2 and stats["params_removed"] == gone + 8      # + the eight gate logits


# ------------------------------------------------------------------------------------------------
# costs

def test_gated_resnet110_counts_paper_sizes():
    """BSN's ResNet-110 (3 stages × 18 basic blocks): 2.54e8 MACs (conv + linear 2.529e8, plus one
    multiply-add per BatchNorm output element, the paper's convention) and 1.73 M parameters with
    every gate on; 110 layers in sequence."""
    model = resnet_cifar(110)
    gm = graphsel.transform(model, ["budget_gates"], torch.randn(1, 3, 32, 32), verify=False)
    assert len(bsn.gates(gm)) == 54
    cm = bsn.ArchitectureCost(gm)
    assert f"{cm.eval_cost('macs') / 1e8:.2f}" == "2.54"
    assert f"{cm.eval_cost('params') / 1e6:.2f}" == "1.73"
    assert cm.eval_cost("params") == _params(model)                   # gate logits are not costed
    assert cm.eval_cost("steps", units=1) == 110 == cm.eval_cost("steps", units=4)   # a chain
    # one residual branch: 2 convs, 2 BNs of the first stage
    bsn.set_gates(gm, ["bsn_gates.features_0_5"])
    branch = 2 * (32 * 32 * 16 * 16 * 9) + 2 * (32 * 32 * 16)
    assert cm.full_cost("macs") - cm.eval_cost("macs") == branch
    assert cm.full_cost("params") - cm.eval_cost("params") == 2 * 16 * 16 * 9 + 2 * 2 * 16
    assert cm.eval_cost("steps", units=1) == 108


def test_costs_of_sampled_architectures_and_expectation():
    gm = graphsel.transform(resnet_cifar(20, in_channels=1), ["budget_gates"], torch.randn(2, 1, 28, 28),
                            verify=False)
    cm = bsn.ArchitectureCost(gm, units=2)
    g = cm.n_gates
    H = np.ones((3, g), dtype=bool)
    H[1, :] = False
    H[2, ::2] = False
    macs = cm.of(H, "macs")
    assert macs[0] == cm.full_cost("macs") and macs[1] < macs[2] < macs[0]
    assert cm.of(H, "steps").tolist() == [20, 20 - 2 * g, 20 - 2 * len(range(0, g, 2))]
    with torch.no_grad():
        for _, gate in bsn.gates(gm):
            gate.logit.fill_(0.0)                                         # p = 0.5 everywhere
    # additive cost: E = C_full − Σ_g 0.5 · (cost of branch g)
    per_branch = [cm.full_cost("macs") - cm.of(np.array([[j != k for j in range(g)]]), "macs")[0] for k in range(g)]
    expected = cm.full_cost("macs") - 0.5 * sum(per_branch)
    assert abs(cm.expected("macs", samples=4000) / expected - 1) < 0.02
    gm.train()
    gm(torch.randn(5, 1, 28, 28))
    assert cm.sampled("macs").shape == (5,)
    table = bsn.latency_table(gm, repeats=1)
    assert all(v >= 0 for v in table.values()) and any(v > 0 for v in table.values())
    timed = bsn.ArchitectureCost(gm, latency=table)
    assert 0 < timed.of(H, "time")[1] < timed.full_cost("time")


# ------------------------------------------------------------------------------------------------
# the distributed computation cost

NINE = {"s0": [], "c1": [], "c2": ["c1"], "s1": ["c2"], "c3": ["c2"], "c4": ["c3"], "s2": ["c4"], "c5": ["c4"],
        "c6": ["c5"]}                                     # fig. 8, blue: a chain of 6 with 3 side modules
TEN = {**{f"a{i}": ([f"a{i - 1}"] if i else []) for i in range(5)},
       **{f"b{i}": ([f"b{i - 1}"] if i else []) for i in range(5)}}   # fig. 8, red: two chains of 5


@pytest.mark.parametrize("dag,units,steps", [
    ({}, 1, 0),
    ({"a": []}, 3, 1),
    ({"a": [], "b": ["a"], "c": ["b"], "d": ["c"]}, 4, 4),                  # a chain: its length
    ({"a": [], "b": [], "c": []}, 2, 2),                                    # 3 independent on 2 units
    ({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}, 1, 4),             # a diamond
    ({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}, 2, 3),
    ({"p": [], "q": [], "r1": [], "r2": ["r1"], "r3": ["r2"]}, 2, 4),       # greedy in order: not optimal
    (NINE, 2, 6), (TEN, 2, 5), (NINE, 1, 9), (TEN, 1, 10), (NINE, 9, 6), (TEN, 10, 5),
])
def test_parallel_steps_known_answers(dag, units, steps):
    assert bsn.parallel_steps(dag, units) == steps


def test_parallel_steps_is_distributed_cost(monkeypatch):
    """One implementation: parallel_steps hands every DAG (dicts and graphs) to the core's
    distributed_cost; on a GraphModule it schedules the eval architecture's layer DAG."""
    import graphsel.passes.bsn.costs as costs
    calls = []
    monkeypatch.setattr(costs, "distributed_cost", lambda dag, n: calls.append(dict(dag)) or distributed_cost(dag, n))

    class Ten(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(*[nn.Conv2d(2, 2, 1) for _ in range(5)])
            self.b = nn.Sequential(*[nn.Conv2d(2, 2, 1) for _ in range(5)])

        def forward(self, x):
            return self.a(x) + self.b(x)

    x = torch.randn(1, 2, 4, 4)
    plain = graphsel.trace(Ten(), (x,))
    assert bsn.parallel_steps(plain, 2) == 5 == distributed_cost(plain, 2)
    assert bsn.parallel_steps(TEN, 2) == 5 and len(calls) == 2
    gated = graphsel.transform(Ten(), [("budget_gates", {"on": ["a", "b"]})], (x,))
    assert len(bsn.gates(gated)) == 2
    bsn.set_gates(gated, ["bsn_gates.b"])
    assert bsn.parallel_steps(gated, 2) == 5 and len(calls[-1]) == 5      # chain b is gone
    assert bsn.ArchitectureCost(gated).eval_cost("steps", units=1) == 5


@pytest.mark.parametrize("dag,units,match", [
    ({"a": ["b"], "b": ["a"]}, 1, "cycle"),
    ({"a": ["a"]}, 2, "cycle"),
    ({"a": ["zz"]}, 1, "not a node"),
    ({"a": []}, 0, "positive int"),
    ({"a": []}, -1, "positive int"),
])
def test_parallel_steps_bad_input(dag, units, match):
    with pytest.raises(CostError, match=match):
        bsn.parallel_steps(dag, units)
    assert issubclass(CostError, GraphselError)


# ------------------------------------------------------------------------------------------------
# fabrics

def test_resnet_fabric_gates_every_edge_and_contains_the_resnet():
    x = torch.randn(2, 1, 28, 28)
    fabric = bsn.ResNetFabric.named("tiny", in_channels=1).eval()
    gm = graphsel.transform(fabric, ["budget_gates"], x)
    names = [n for n, _ in bsn.gates(gm)]
    assert len(names) == 3 * 2 + 2 * 3                        # chain: k·n; cross: 1 + 2 per later group
    assert sum("cross" in n for n in names) == 6
    cm = bsn.ArchitectureCost(gm, units=2)
    bsn.set_gates(gm, [n for n in names if "cross" in n])     # the plain ResNet-14 backbone
    backbone = graphsel.trace(bsn.ResNetFabric.named("tiny", in_channels=1, cross=False), (x,))
    assert cm.eval_cost("macs") == bsn.ArchitectureCost(backbone).eval_cost("macs")
    assert cm.eval_cost("steps") == 14 and cm.full_cost("steps") > 14
    slim = graphsel.transform(gm, ["bsn_extract"], x)
    assert _params(slim) == _params(backbone)
    # include / exclude match the branch's module (the innermost module holding the residual function)
    last = graphsel.transform(fabric, [("budget_gates", {"exclude": "groups.2.*"})], x, verify=False)
    assert len(bsn.gates(last)) == 12 - 2 - 3
    only = graphsel.transform(fabric, [("budget_gates", {"include": ["groups.*.cross.*"]})], x, verify=False)
    assert len(bsn.gates(only)) == 6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_neural_fabric_blocks_disconnected_edges_are_exact(seed):
    x = torch.randn(2, 1, 16, 16)
    fabric = bsn.ConvNeuralFabric.named("tiny", in_channels=1, input_size=16)
    for m in fabric.modules():                                 # non-trivial BN shifts: f(0) ≠ 0
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.bias)
            nn.init.uniform_(m.running_mean, -1, 1)
    gm = graphsel.transform(fabric, [("budget_gates", {"on": "blocks"})], x)
    names = [n for n, _ in bsn.gates(gm)]
    assert len(names) == 16
    rng = random.Random(seed)
    path = {"bsn_gates.edges_c1_s0_same", "bsn_gates.edges_c2_s1_down", "bsn_gates.edges_c2_s2_vertical"}
    off = rng.sample(sorted(set(names) - path), 8)                    # an input → output path stays
    off += [n for n in names if n.startswith("bsn_gates.edges_c1_s1")]   # disconnect node (1, 1)
    bsn.set_gates(gm, off)
    cm = bsn.ArchitectureCost(gm, units=2)
    slim = graphsel.transform(gm, ["bsn_extract"], x)          # exact: verified in the pipeline
    stats = graphsel_meta(slim).history[-1].stats
    assert stats["disconnected"] >= 1 and stats["constants"] == 0
    sc = bsn.ArchitectureCost(slim, units=2)
    for kind in ("macs", "params", "steps"):
        assert cm.eval_cost(kind) == sc.eval_cost(kind)
    assert cm.eval_cost("params") == _params(slim)
    kept = graphsel.transform(gm, [("bsn_extract", {"keep_gates": True})], x)   # to go on training
    assert len(bsn.gates(kept)) == stats["gates"] - stats["off"] - stats["disconnected"]
    assert bsn.ArchitectureCost(kept).eval_cost("macs") == cm.eval_cost("macs")


# ------------------------------------------------------------------------------------------------
# training

def test_budgeted_trainer_reinforce_pushes_gates_off_over_budget():
    torch.manual_seed(0)
    gm = graphsel.transform(resnet_cifar(8, in_channels=1), ["budget_gates"], torch.randn(2, 1, 12, 12),
                            verify=False)
    tr = bsn.BudgetedTrainer(gm, fraction=0.3, lam=1.0)
    assert tr.lam == 1.0 and bsn.BudgetedTrainer(gm, fraction=0.3).lam == bsn.DEFAULT_LAMBDA == 5.0
    groups = tr.param_groups(logit_lr=0.5)
    assert [g["name"] for g in groups] == ["weights", "weights_no_decay", "gate_logits"]
    assert groups[2]["lr"] == 0.5 and len(groups[2]["params"]) == len(bsn.gates(gm)) == 3
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    before = tr.logits().detach().clone()
    data = [(torch.randn(32, 1, 12, 12), torch.randint(0, 10, (32,))) for _ in range(4)]
    history = tr.fit(data, opt, epochs=3, progress=False)
    assert len(history) == 3 and history[0]["budget"] == pytest.approx(0.3)
    assert (tr.logits().detach() < before).all()              # every gate is pushed towards off
    assert history[-1]["expected_cost"] < history[0]["sampled_cost"]
    # warm-up: no sampling, no gradient for the logits
    tr.fit(data[:1], opt, epochs=1, warmup_epochs=1, progress=False)
    gm.train()
    out = gm(data[0][0])
    loss, stats = tr.loss(out, data[0][1])
    assert stats.samples == 32 and 0 <= stats.over_budget <= 1


def test_trainer_distributed_cost_budget():
    gm = graphsel.transform(bsn.ResNetFabric.named("tiny", in_channels=1), ["budget_gates"],
                            torch.randn(2, 1, 12, 12), verify=False)
    tr = bsn.BudgetedTrainer(gm, budget=14, cost="steps", units=2)
    assert tr.full > 14 and tr.fraction == 14 / tr.full
    gm.train()
    out = gm(torch.randn(8, 1, 12, 12))
    loss, stats = tr.loss(out, torch.randint(0, 10, (8,)))
    loss.backward()
    assert all(g.logit.grad is not None for _, g in bsn.gates(gm))


# ------------------------------------------------------------------------------------------------
# bad input

def test_no_residual_branch_is_a_reported_noop():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))
    gm = graphsel.transform(model, ["budget_gates"], torch.randn(1, 3, 8, 8))
    assert not bsn.gates(gm)
    rec = graphsel_meta(gm).history[-1]
    assert rec.stats["gates"] == 0 and not rec.modified
    assert any("no-op" in d.message for d in rec.diagnostics)
    gm2 = graphsel.transform(model, [("budget_gates", {"on": "blocks"})], torch.randn(1, 3, 8, 8))
    assert not bsn.gates(gm2)
    noop = graphsel.transform(model, ["bsn_extract"], torch.randn(1, 3, 8, 8))
    assert graphsel_meta(noop).history[-1].stats["gates"] == 0


def test_bad_input_is_a_clear_error():
    x = torch.randn(1, 1, 12, 12)
    model = resnet_cifar(8, in_channels=1)
    for bad in ([], None):
        with pytest.raises(GraphselError, match="on must be"):
            graphsel.transform(model, [("budget_gates", {"on": bad})], x)
    with pytest.raises(GraphselError, match="init"):
        bsn.BudgetGates(init=-1.0)
    with pytest.raises(GraphselError, match="not a module"):
        graphsel.transform(model, [("budget_gates", {"on": ["features.0.9"]})], x)
    gm = graphsel.transform(model, ["budget_gates"], x, verify=False)
    for kw in ({"budget": 0}, {"budget": -5.0}, {"fraction": 0.0}, {"fraction": float("nan")}, {},
               {"budget": 1.0, "fraction": 0.5}):
        with pytest.raises(GraphselError):
            bsn.BudgetedTrainer(gm, **kw)
    with pytest.raises(GraphselError, match="units"):
        bsn.BudgetedTrainer(gm, fraction=0.5, cost="steps", units=0)
    with pytest.raises(GraphselError, match="unknown cost"):
        bsn.BudgetedTrainer(gm, fraction=0.5, cost="flops")
    with pytest.raises(GraphselError, match="no budget gates"):
        bsn.BudgetedTrainer(graphsel.trace(model, (x,)), fraction=0.5)
    with pytest.raises(GraphselError, match="units"):
        bsn.ArchitectureCost(gm).eval_cost("steps", units=0)
    with pytest.raises(KeyError):
        bsn.set_gates(gm, ["no.such.gate"])
    # a whole stage gated as a module cuts every path: off, nothing is left to extract
    cut = graphsel.transform(model, [("budget_gates", {"on": "features.1"})], x)
    rec = graphsel_meta(cut).history[-1]
    assert any(d.level == "warning" and "disconnects" in d.message for d in rec.diagnostics)
    bsn.set_gates(cut, [n for n, _ in bsn.gates(cut)])
    with pytest.raises(GraphselError, match="no input → output path"):
        graphsel.transform(cut, ["bsn_extract"], x)


# ------------------------------------------------------------------------------------------------
# the zoo

# every torchvision family with residual branches: plain, bottleneck, grouped, wide, SE + inverted
# residual, ConvNeXt's layer-scaled blocks, RegNet
ZOO = [("resnet18", 8), ("resnet50", 16), ("mobilenet_v2", 10), ("resnext50_32x4d", 16), ("regnet_y_400mf", 16),
       ("efficientnet_b0", 9), ("mobilenet_v3_large", 10), ("convnext_tiny", 18)]


def _check_model(model, x, expected_gates):
    gm = graphsel.transform(model, ["budget_gates"], x)
    names = [n for n, _ in bsn.gates(gm)]
    assert len(names) == expected_gates
    bsn.set_gates(gm, names[::2])
    cm = bsn.ArchitectureCost(gm, units=2)
    slim = graphsel.transform(gm, ["bsn_extract"], x)                # verified: equal to gm in eval
    assert not bsn.gates(slim)
    sc = bsn.ArchitectureCost(slim, units=2)
    for kind in ("macs", "params", "steps"):
        assert cm.eval_cost(kind) == sc.eval_cost(kind)
    assert cm.eval_cost("params") == _params(slim) < _no_logits(gm)
    trainer = bsn.BudgetedTrainer(gm, fraction=0.5)                  # one REINFORCE step
    opt = torch.optim.SGD(trainer.param_groups(), lr=1e-3)
    stats = trainer.step(torch.randn(4, *x.shape[1:]), torch.randint(0, 10, (4,)), opt)
    assert stats.samples == 4 and all(g.logit.grad is not None for _, g in bsn.gates(gm))


@pytest.mark.zoo
@pytest.mark.parametrize("name,gates", ZOO)
def test_zoo_torchvision(name, gates):
    torchvision = pytest.importorskip("torchvision")
    from strategies import randomize_norm_layers
    torch.manual_seed(0)
    model = randomize_norm_layers(torchvision.models.get_model(name, num_classes=10)).eval()
    _check_model(model, torch.randn(2, 3, 32, 32), gates)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["densenet121", "shufflenet_v2_x1_0"])
def test_zoo_without_residual_branches_is_a_reported_noop(name):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.get_model(name, num_classes=10).eval()
    gm = graphsel.transform(model, ["budget_gates"], torch.randn(1, 3, 32, 32))
    assert not bsn.gates(gm)
    assert any("no residual branch" in d.message for d in graphsel_meta(gm).history[-1].diagnostics)


@pytest.mark.zoo
def test_zoo_timm_convnext():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", num_classes=10).eval()
    _check_model(model, torch.randn(2, 3, 32, 32), 2 + 2 + 6 + 2)
