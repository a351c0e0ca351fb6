"""graphsel.transform: history rows, contract verification, errors, the registry, the analysis cache."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphsel
from graphsel import (Contract, Diagnostic, FunctionChangedError, Pass, PassContext, PassError, PassResult,
                      graphsel_meta, register_analysis, register_pass)
from graphsel.pipeline import registry
from strategies import assert_model_unchanged, assert_same_function, model_snapshot


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def make_net() -> nn.Module:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net.eval()


X = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)


# --------------------------------------------------------------------------------------------
# Passes used by these tests (not registered unless a test does so)
# --------------------------------------------------------------------------------------------
class ScaleWeight(Pass):
    """Multiplies one module's weight: changes the function (a wrong pass when declared exact)."""
    name = "scale_weight"
    contract = Contract.EXACT
    inplace_tensors = True      # edits a weight in place: asks the pipeline for a deep copy

    def __init__(self, target: str = "conv1", factor: float = 1.5):
        super().__init__(target=target, factor=factor)
        self.target, self.factor = target, factor

    def run(self, gm, ctx):
        with torch.no_grad():
            gm.get_submodule(self.target).weight.mul_(self.factor)
        return PassResult(gm, modified=True)


class NudgeBias(Pass):
    """Adds ``delta`` to the classifier bias: output moves by exactly ``delta``; states ``bound``."""
    name = "nudge_bias"
    contract = Contract.APPROXIMATE
    inplace_tensors = True

    def __init__(self, delta: float = 1e-2, bound: float | None = None):
        super().__init__(delta=delta, bound=bound)
        self.delta, self.bound = delta, bound

    def run(self, gm, ctx):
        with torch.no_grad():
            gm.fc.bias.add_(self.delta)
        return PassResult(gm, modified=True, bound=self.bound)


class Explodes(Pass):
    name = "explodes"
    contract = Contract.EXACT

    def run(self, gm, ctx):
        raise ZeroDivisionError("boom")


class BreaksTopology(Pass):
    """Moves the output's producer after the output: graph.lint() fails."""
    name = "breaks_topology"
    contract = Contract.EXACT

    def run(self, gm, ctx):
        out = next(iter(gm.graph.find_nodes(op="output")))
        producer = out.args[0]
        out.append(producer)  # producer now follows its user
        return PassResult(gm, modified=True)


class DropsModule(Pass):
    """Deletes a submodule that a node still calls."""
    name = "drops_module"
    contract = Contract.EXACT

    def run(self, gm, ctx):
        delattr(gm, "fc")
        return PassResult(gm, modified=True)


class DropsAttribute(Pass):
    """Inserts a get_attr of a parameter that does not exist."""
    name = "drops_attribute"
    contract = Contract.EXACT

    def run(self, gm, ctx):
        out = next(iter(gm.graph.find_nodes(op="output")))
        with gm.graph.inserting_before(out):
            gm.graph.get_attr("no_such.weight")
        return PassResult(gm, modified=True)


class ReturnsJunk(Pass):
    name = "returns_junk"
    contract = Contract.EXACT

    def __init__(self, junk=None):
        super().__init__()
        self.junk = junk

    def run(self, gm, ctx):
        return self.junk(gm) if callable(self.junk) else self.junk


# --------------------------------------------------------------------------------------------
# History and report
# --------------------------------------------------------------------------------------------
def test_transform_records_a_history_row_per_pass():
    model = make_net()
    out = graphsel.transform(model, ["fuse_bn"], X)
    (row,) = graphsel_meta(out).history
    assert row.name == "fuse_bn" and row.contract == "exact" and row.modified
    assert row.stats["fused"] == 2
    bn_nodes = 2
    assert row.nodes_removed == bn_nodes and row.nodes_added == 0
    assert row.nodes_before - row.nodes_after == bn_nodes
    assert row.params_before == sum(p.numel() for p in model.parameters())
    assert row.params_after == sum(p.numel() for p in out.parameters())
    # bn1 (16 params) folds into a bias-free conv, which gains a bias (8); bn2 (16) into a biased conv.
    assert row.params_before - row.params_after == 16 - 8 + 16
    assert row.macs_before and row.macs_after and row.macs_after <= row.macs_before
    assert row.max_abs is not None and row.max_abs <= row.tolerance
    assert row.seconds >= 0 and row.verify_seconds > 0
    text = graphsel.report(out)
    assert "fuse_bn" in text and "fused=2" in text and "exact" in text
    assert_same_function(model, out, X)


def test_transform_on_a_graphsel_module_continues_its_history():
    gm = graphsel.trace(make_net(), X)
    once = graphsel.transform(gm, ["fuse_bn"])
    twice = graphsel.transform(once, ["fuse_bn"])
    rows = graphsel_meta(twice).history
    assert [r.name for r in rows] == ["fuse_bn", "fuse_bn"]
    assert rows[1].modified is False and rows[1].stats["fused"] == 0
    assert len(graphsel_meta(once).history) == 1  # the input of the second call is untouched


def test_verify_false_skips_verification_and_says_so():
    out = graphsel.transform(make_net(), [ScaleWeight()], X, verify=False)
    row = graphsel_meta(out).history[-1]
    assert row.max_abs is None
    assert "not verified" in graphsel.report(out)


# --------------------------------------------------------------------------------------------
# Contracts
# --------------------------------------------------------------------------------------------
def test_a_wrong_exact_pass_raises_function_changed_error():
    model = make_net()
    snap = model_snapshot(model)
    with pytest.raises(FunctionChangedError) as info:
        graphsel.transform(model, ["fuse_bn", ScaleWeight("conv2", 1.5)], X)
    err = info.value
    assert err.pass_name == "scale_weight" and err.contract == "exact"
    assert err.max_abs > err.tolerance and 0 < err.max_rel
    assert err.node == "conv2"  # conv1's output is unchanged; conv2's is the first to move
    msg = str(err)
    for part in ("scale_weight", "max abs error", "max rel error", "first diverging node: conv2"):
        assert part in msg
    assert_model_unchanged(model, snap)


def test_approximate_pass_bound_is_checked():
    delta = 1e-2
    out = graphsel.transform(make_net(), [NudgeBias(delta, bound=2 * delta)], X)
    row = graphsel_meta(out).history[-1]
    assert row.contract == "approximate"
    assert row.max_abs == pytest.approx(delta, rel=1e-3)
    assert row.tolerance == 2 * delta
    with pytest.raises(FunctionChangedError) as info:
        graphsel.transform(make_net(), [NudgeBias(delta, bound=delta / 2)], X)
    assert info.value.contract == "approximate" and info.value.max_abs == pytest.approx(delta, rel=1e-3)
    # Without a bound, the deviation is only reported.
    out = graphsel.transform(make_net(), [NudgeBias(delta)], X)
    assert graphsel_meta(out).history[-1].max_abs == pytest.approx(delta, rel=1e-3)


def test_a_pass_raising_an_exception_becomes_pass_error():
    model = make_net()
    snap = model_snapshot(model)
    with pytest.raises(PassError) as info:
        graphsel.transform(model, ["fuse_bn", Explodes()], X)
    assert info.value.pass_name == "explodes"
    assert "ZeroDivisionError" in str(info.value) and "boom" in str(info.value)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert_model_unchanged(model, snap)


@pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node:UserWarning",
                            "ignore:Failed to fetch module:UserWarning")
@pytest.mark.parametrize("bad_pass, message", [
    (BreaksTopology(), "invalid graph"),
    (DropsModule(), "calls module 'fc', which does not exist"),
    (DropsAttribute(), "reads attribute 'no_such.weight', which does not exist"),
    (ReturnsJunk(None), "not a graphsel.PassResult"),
    (ReturnsJunk(lambda gm: PassResult(nn.Linear(1, 1), True)), "not a torch.fx.GraphModule"),
])
def test_invalid_results_become_pass_errors(bad_pass, message):
    model = make_net()
    snap = model_snapshot(model)
    with pytest.raises(PassError) as info:
        graphsel.transform(model, [bad_pass], X)
    assert message in str(info.value) and info.value.pass_name == bad_pass.name
    assert not isinstance(info.value, FunctionChangedError)
    assert_model_unchanged(model, snap)


def test_user_model_untouched_after_success():
    model = make_net().train()
    snap = model_snapshot(model)
    out = graphsel.transform(model, ["fuse_bn"], X)
    assert_model_unchanged(model, snap)
    assert out.training
    assert not {id(t) for t in model.state_dict(keep_vars=True).values()} & {
        id(t) for t in out.state_dict(keep_vars=True).values()}


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
@pytest.fixture
def registered_scale_weight():
    register_pass(ScaleWeight)
    yield ScaleWeight
    registry._REGISTRY.pop(ScaleWeight.name, None)


def test_registry_resolves_names_options_and_comma_strings(registered_scale_weight):
    assert "fuse_bn" in graphsel.available_passes()
    p = graphsel.resolve_pass(("scale_weight", {"factor": 2.0}))
    assert isinstance(p, ScaleWeight) and p.factor == 2.0 and p.options == {"target": "conv1", "factor": 2.0}
    assert [q.name for q in graphsel.resolve_passes("fuse_bn, scale_weight")] == ["fuse_bn", "scale_weight"]
    assert [q.name for q in graphsel.resolve_passes(("scale_weight", {"factor": 1.0}))] == ["scale_weight"]
    assert [q.name for q in graphsel.resolve_passes(ScaleWeight)] == ["scale_weight"]
    instance = ScaleWeight()
    assert graphsel.resolve_passes([instance, "fuse_bn"])[0] is instance
    assert graphsel.resolve_passes(None) == []
    out = graphsel.transform(make_net(), "fuse_bn,scale_weight", X, verify=False)
    assert [r.name for r in graphsel_meta(out).history] == ["fuse_bn", "scale_weight"]
    assert graphsel_meta(out).history[1].options == {"target": "conv1", "factor": 1.5}


def test_unknown_names_suggest_the_closest_and_list_all():
    with pytest.raises(ValueError) as info:
        graphsel.transform(make_net(), ["fuse_nb"], X)
    msg = str(info.value)
    assert "unknown pass 'fuse_nb'" in msg and "Did you mean 'fuse_bn'?" in msg and "Registered passes:" in msg
    with pytest.raises(ValueError, match="Registered passes: .*fuse_bn"):
        graphsel.resolve_pass("zzzzzz")


def test_bad_options_list_the_valid_ones(registered_scale_weight):
    with pytest.raises(TypeError) as info:
        graphsel.resolve_pass(("scale_weight", {"factr": 2.0}))
    assert "'factr'" in str(info.value) and "target, factor" in str(info.value)
    with pytest.raises(TypeError, match="its options are: \\(none\\)"):
        graphsel.resolve_pass(("fuse_bn", {"ratio": 0.5}))


@pytest.mark.parametrize("bad", [3, object(), nn.Conv2d(1, 1, 1), ("fuse_bn", "not a dict"), torch.relu])
def test_things_that_are_not_passes_are_rejected(bad):
    with pytest.raises(TypeError, match="cannot use .* as a pass"):
        graphsel.resolve_pass(bad)


def test_register_pass_validates_its_input():
    graphsel.resolve_pass("fuse_bn")             # the built-in passes are registered on first use
    with pytest.raises(TypeError):
        register_pass(nn.Conv2d)

    class Nameless(Pass):
        pass

    with pytest.raises(ValueError, match="non-empty identifier"):
        register_pass(Nameless)

    class Clash(Pass):
        name = "fuse_bn"

    with pytest.raises(ValueError, match="taken"):
        register_pass(Clash)


# --------------------------------------------------------------------------------------------
# Analysis cache
# --------------------------------------------------------------------------------------------
CALLS: list[str] = []


@register_analysis("test_counting")
def _counting_analysis(gm, ctx):
    CALLS.append("x")
    return sum(1 for _ in gm.graph.nodes)


def test_analysis_cache_is_reused_and_invalidated():
    CALLS.clear()
    gm = graphsel.trace(make_net(), X)
    ctx = PassContext.for_graph(gm)
    first = ctx.analysis("test_counting", gm)
    assert ctx.analysis("test_counting", gm) == first and len(CALLS) == 1
    assert ctx.analysis("test_counting", copy.deepcopy(gm)) == first and len(CALLS) == 1  # same structure
    fused = graphsel.passes.FuseBatchNorm()(copy.deepcopy(gm), ctx).gm     # a pass that says it modified
    assert ctx.analysis("test_counting", fused) == first - 2 and len(CALLS) == 2  # graph edited: new version
    widened = copy.deepcopy(gm)
    widened.fc = nn.Linear(8, 6)  # an edit by hand: explicit invalidation
    ctx.invalidate(widened)
    ctx.analysis("test_counting", widened)
    assert len(CALLS) == 3
    ctx.invalidate()
    ctx.analysis("test_counting", gm)
    assert len(CALLS) == 4
    with pytest.raises(KeyError, match="unknown analysis"):
        ctx.analysis("no_such_analysis", gm)


def test_analyses_are_shared_by_the_passes_of_one_pipeline():
    seen: list[int] = []

    class UsesModules(Pass):
        name = "uses_modules"
        contract = Contract.EXACT

        def run(self, gm, ctx):
            seen.append(id(ctx.analysis("modules", gm)))
            return PassResult(gm, modified=False, diagnostics=[Diagnostic("looked", level="info")])

    graphsel.transform(make_net(), [UsesModules(), UsesModules()], X)
    assert len(seen) == 2 and seen[0] == seen[1]  # unmodified graph: the cached analysis is reused
    seen.clear()
    graphsel.transform(make_net(), [UsesModules(), "fuse_bn", UsesModules()], X)
    assert seen[0] != seen[1]  # fuse_bn modified the graph: recomputed


def test_verification_uses_example_and_random_inputs():
    gm = graphsel.trace(make_net(), X)
    ctx = PassContext.for_graph(gm, n_random_inputs=3, seed=5)
    inputs = ctx.verify_inputs()
    assert len(inputs) == 4 and inputs[0] is ctx.example_inputs
    assert all(t[0].shape == X[0].shape for t in inputs)
    assert not torch.equal(inputs[1][0], inputs[2][0])
    again = PassContext.for_graph(gm, n_random_inputs=3, seed=5).verify_inputs()
    assert all(torch.equal(a[0], b[0]) for a, b in zip(inputs, again))


def test_pass_objects_are_callable_without_a_pipeline():
    gm = graphsel.trace(make_net(), X)
    result = graphsel.passes.FuseBatchNorm()(gm)
    assert isinstance(result, PassResult) and result.modified and result.stats["fused"] == 2
    assert isinstance(result.gm, fx.GraphModule)
    assert repr(ScaleWeight(factor=2.0)) == "ScaleWeight(target='conv1', factor=2.0)"


class InPlaceWithoutSaying(ScaleWeight):
    """The same edit without declaring it: the pipeline's tensor version check must catch it."""
    name = "scale_weight_silently"
    inplace_tensors = False


def test_in_place_tensor_edit_without_declaring_it_is_caught_and_the_input_survives():
    model = make_net()
    snap = model_snapshot(model)
    gm = graphsel.trace(model, X)
    before = gm.get_submodule("conv1").weight.detach().clone()
    with pytest.raises(PassError, match="modified tensor 'conv1.weight' in place"):
        graphsel.transform(gm, [InPlaceWithoutSaying()], X)
    assert torch.equal(gm.get_submodule("conv1").weight, before)     # the input GraphModule is deep-copied first
    assert_model_unchanged(model, snap)


class RecordsGcState(Pass):
    name = "records_gc_state"
    contract = Contract.EXACT
    seen: list[bool] = []

    def run(self, gm, ctx):
        import gc
        RecordsGcState.seen.append(gc.isenabled())
        return PassResult(gm, False)


@pytest.mark.parametrize("enabled", [True, False])
def test_transform_pauses_the_garbage_collector_and_restores_its_state(enabled):
    import gc
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        RecordsGcState.seen = []
        graphsel.transform(make_net(), [RecordsGcState()], X)
        assert RecordsGcState.seen == [False] and gc.isenabled() is enabled
        with pytest.raises(PassError):
            graphsel.transform(make_net(), [Explodes()], X)
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


class HalvesConv1Resolution(Pass):
    """Changes a module setting (stride) without touching the graph or any tensor shape."""
    name = "halves_conv1_resolution"
    contract = Contract.STRUCTURAL

    def run(self, gm, ctx):
        gm.get_submodule("conv1").stride = (2, 2)
        return PassResult(gm, True)


def test_shapes_are_repropagated_when_only_a_module_setting_changed():
    gm = graphsel.transform(make_net(), [HalvesConv1Resolution()], X)
    conv1 = next(n for n in gm.graph.nodes if n.target == "conv1")
    assert tuple(conv1.meta["tensor_meta"].shape) == (2, 8, 4, 4)


def test_metadata_only_passes_keep_code_and_shapes_of_their_copy():
    gm = graphsel.transform(make_net(), [("prune", {"ratio": 0.5})], X)
    assert gm.code == gm.graph.python_code("self").src
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op != "output")
    slim = graphsel.transform(gm, ["materialize"])
    conv1 = next(n for n in slim.graph.nodes if n.target == "conv1")
    assert conv1.meta["tensor_meta"].shape[1] == slim.get_submodule("conv1").out_channels < 8


# --------------------------------------------------------------------------------------------
# verify=False: no per-pass copies, parameters shared with the user's model until the end
# --------------------------------------------------------------------------------------------
class TiedNet(Net):
    def __init__(self):
        super().__init__()
        self.fc2 = nn.Linear(8, 4)
        self.fc2.weight = self.fc.weight            # tied

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        f = torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn2(self.conv2(x))), 1), 1)
        return self.fc(f) + self.fc2(f)


@pytest.mark.parametrize("passes", [["fuse_bn"], ["prune", "fold_masks", "materialize"], []])
def test_verify_false_returns_a_module_sharing_no_tensor_with_the_model(passes):
    torch.manual_seed(0)
    model = TiedNet().eval()
    snap = model_snapshot(model)
    out = graphsel.transform(model, passes, X, verify=False)
    theirs = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert not any(t.data_ptr() in theirs for t in list(out.parameters()) + list(out.buffers()))
    if "materialize" not in passes:       # (materialize slices each module: tied weights become two)
        assert out.get_submodule("fc").weight is out.get_submodule("fc2").weight      # still tied
    assert_model_unchanged(model, snap)
    if not passes:
        assert_same_function(model, out, X)


def test_verify_false_in_place_pass_gets_a_copy_and_the_model_survives():
    model = make_net()
    snap = model_snapshot(model)
    out = graphsel.transform(model, [ScaleWeight()], X, verify=False)     # declares inplace_tensors
    assert torch.allclose(out.get_submodule("conv1").weight, model.conv1.weight * 1.5)
    assert_model_unchanged(model, snap)


def test_verify_false_still_reports_an_undeclared_in_place_edit():
    with pytest.raises(PassError, match="modified tensor 'conv1.weight' in place"):
        graphsel.transform(make_net(), [InPlaceWithoutSaying()], X, verify=False)


def _route_conv1_through(gm, make_node):
    """Insert ``make_node(graph, conv1_node)`` after conv1 and give it conv1's other users;
    returns (conv1's node, the new node)."""
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv1")
    with gm.graph.inserting_after(conv):
        new = make_node(gm.graph, conv)
    conv.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    return conv, new


class ClaimsShapes(Pass):
    """An exact rewrite (a clone after conv1) that records a wrong shape and says shapes_current."""
    name = "claims_shapes"
    contract = Contract.EXACT

    def run(self, gm, ctx):
        conv, c = _route_conv1_through(gm, lambda g, conv: g.call_method("clone", (conv,)))
        tm = conv.meta["tensor_meta"]
        c.meta["tensor_meta"] = tm._replace(shape=torch.Size([tm.shape[0], tm.shape[1] + 1, *tm.shape[2:]]))
        return PassResult(gm, modified=True, shapes_current=True)


def test_shapes_a_pass_records_are_checked_under_verification_and_trusted_without():
    with pytest.raises(PassError, match=r"recorded shapes .* for node 'clone'.*shapes_current=True"):
        graphsel.transform(make_net(), [ClaimsShapes()], X)
    out = graphsel.transform(make_net(), [ClaimsShapes()], X, verify=False)
    clone = next(n for n in out.graph.nodes if n.name == "clone")
    assert clone.meta["tensor_meta"].shape[1] == 9          # the pass's word, not re-propagated


class RewrapsWeight(Pass):
    """Replaces conv1's weight with a new Parameter over the same memory (``.data``): an alias the
    identity of the Parameter object does not reveal."""
    name = "rewraps_weight"
    contract = Contract.EXACT

    def run(self, gm, ctx):
        conv = gm.get_submodule("conv1")
        conv.weight = nn.Parameter(conv.weight.data)
        conv.register_buffer("weight_view", conv.weight.detach()[:1])
        return PassResult(gm, True)


def test_verify_false_unshares_aliases_a_pass_made_of_the_models_parameters():
    model = make_net()
    snap = model_snapshot(model)
    out = graphsel.transform(model, [RewrapsWeight()], X, verify=False)
    theirs = {t.untyped_storage().data_ptr() for t in model.parameters()}
    assert not any(t.untyped_storage().data_ptr() in theirs for t in list(out.parameters()) + list(out.buffers()))
    with torch.no_grad():
        out.get_submodule("conv1").weight.mul_(2)
    assert_model_unchanged(model, snap)


class EditsButSaysUnmodified(Pass):
    """Doubles conv1's output in the graph and reports ``modified=False`` (a buggy pass)."""
    name = "edits_but_says_unmodified"
    contract = Contract.APPROXIMATE

    def run(self, gm, ctx):
        _route_conv1_through(gm, lambda g, conv: g.call_function(torch.mul, (conv, 2.0)))
        return PassResult(gm, modified=False)


def test_verify_false_catches_a_graph_edit_a_pass_reports_as_unmodified():
    """Without verification a pass's ``modified=False`` is trusted only while the graph's
    fingerprint agrees: the edit is still compiled into the returned module's code."""
    torch.manual_seed(0)
    model = make_net()
    out = graphsel.transform(model, [EditsButSaysUnmodified()], X, verify=False)
    assert any(n.target is torch.mul for n in out.graph.nodes)
    assert "torch.mul" in out.code
    reference = graphsel.trace(model, X)
    with torch.no_grad():
        assert not torch.allclose(out(*X), reference(*X))


# --------------------------------------------------------------------------------------------
# graph_utils.recompile: code is regenerated exactly when the graph's code would change
# --------------------------------------------------------------------------------------------
def test_recompile_keeps_the_code_when_only_modules_change():
    from graphsel.ir.graph import recompile
    model = make_net()
    gm = graphsel.trace(model, X)
    code = gm._code
    gm.conv1 = nn.Conv2d(3, 8, 3, padding=1)            # a new module, same graph
    recompile(gm)
    assert gm._code is code                             # nothing regenerated
    model.conv1 = gm.conv1
    with torch.no_grad():
        assert torch.equal(gm(*X), model.eval()(*X))    # and the new module runs
    relu = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.relu)
    relu.target = torch.sigmoid                         # a graph edit
    recompile(gm)
    assert gm._code is not code and "sigmoid" in gm.code


def test_recompile_regenerates_after_someone_else_compiled_an_intermediate_graph():
    """A pass that adds nodes, calls gm.recompile() to run them and removes them again leaves a
    graph equal to the recorded one but code of the intermediate graph: recompile must notice."""
    from graphsel.ir.graph import recompile
    gm = graphsel.trace(make_net(), X)
    with torch.no_grad():
        want = gm(*X)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    src = out.args[0]
    with gm.graph.inserting_before(out):
        doubled = gm.graph.call_function(torch.mul, (src, 2.0))
    out.args = (doubled,)
    gm.recompile()                                      # the intermediate graph's code
    out.args = (src,)
    gm.graph.erase_node(doubled)                        # graph back to the recorded one
    recompile(gm)
    assert "torch.mul" not in gm.code
    with torch.no_grad():
        assert torch.equal(gm(*X), want)
