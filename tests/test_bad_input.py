"""Bad input gets a clear error (what, where, how to fix) or a reported no-op, never a silently
different model (issue 2, "Bad input")."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphsel
from graphsel import ExampleInputError, PassError, TraceError, graphsel_meta
from strategies import assert_model_unchanged, assert_same_function, model_snapshot


def make_net(c: int = 8) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                        nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 4))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))


# --------------------------------------------------------------------------------------------
# Wrong types
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("not_a_module", [lambda x: x, "resnet18", torch.randn(3), None, nn.Conv2d])
def test_a_non_module_is_rejected_by_every_entry_point(not_a_module):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        graphsel.trace(not_a_module, X)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        graphsel.transform(not_a_module, ["fuse_bn"], X)


def test_report_of_something_graphsel_did_not_make_is_rejected():
    with pytest.raises(TypeError, match="graphsel.trace or graphsel.transform"):
        graphsel.report(make_net())
    with pytest.raises(TypeError):
        graphsel.report(fx.symbolic_trace(make_net()))


def test_unknown_pass_names_are_rejected_before_any_work():
    model = make_net()
    snap = model_snapshot(model)
    with pytest.raises(ValueError, match="unknown pass 'fusebn'. Did you mean 'fuse_bn'?"):
        graphsel.transform(model, ["fusebn"], X)
    with pytest.raises(ValueError, match="unknown pass 'nope'"):
        graphsel.transform(model, "fuse_bn,nope", X)
    assert_model_unchanged(model, snap)


@pytest.mark.parametrize("bad", [[nn.ReLU()], [42], [F.relu], 42, [("fuse_bn", ["not", "a", "dict"])]])
def test_a_pass_of_the_wrong_type_is_rejected(bad):
    with pytest.raises(TypeError, match="pass"):
        graphsel.transform(make_net(), bad, X)


def test_a_pass_class_that_is_not_a_graphsel_pass_is_rejected():
    class NotAPass:
        name = "not_a_pass"

        def run(self, gm, ctx):
            return gm

    with pytest.raises(TypeError, match="cannot use"):
        graphsel.transform(make_net(), [NotAPass()], X)


# --------------------------------------------------------------------------------------------
# Example inputs
# --------------------------------------------------------------------------------------------
def test_mismatched_example_inputs_name_the_failing_node():
    with pytest.raises(ExampleInputError) as info:
        graphsel.trace(make_net(), torch.randn(2, 5, 8, 8))  # 5 channels for a 3-channel conv
    msg = str(info.value)
    assert "at node '_0'" in msg and "module '0'" in msg and "2x5x8x8 float32" in msg
    assert "expected input[2, 5, 8, 8] to have 3 channels" in msg  # the real cause, not ShapeProp's wrapper
    assert "Pass example_inputs with the shape" in msg
    with pytest.raises(ExampleInputError) as info:
        graphsel.transform(make_net(), ["fuse_bn"], torch.randn(2, 5, 8, 8))
    assert isinstance(info.value, ValueError)  # catchable as a ValueError too


def test_flatten_mismatch_is_reported_at_the_linear_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ExampleInputError, match="at node '_2' \\(module '2'\\)"):
        graphsel.trace(model, torch.randn(1, 3, 16, 16))


def test_wrong_number_or_type_of_example_inputs():
    with pytest.raises(ExampleInputError, match="takes 1 input \\(input\\) but 2 example inputs"):
        graphsel.trace(make_net(), (X, X))
    with pytest.raises(TypeError, match="example_inputs\\[1\\] is a str"):
        graphsel.trace(make_net(), (X, "x"))
    with pytest.raises(TypeError, match="tensor or a tuple of tensors"):
        graphsel.trace(make_net(), {"x": X})


def test_dtype_mismatch_between_model_and_inputs_is_an_example_input_error():
    with pytest.raises(ExampleInputError, match="float16"):
        graphsel.trace(make_net(), X.half())


def test_a_model_without_layers_to_infer_inputs_from_asks_for_example_inputs():
    with pytest.raises(ExampleInputError, match="pass example_inputs"):
        graphsel.trace(nn.Sequential(nn.ReLU(), nn.Flatten()))
    out = graphsel.transform(nn.Sequential(nn.ReLU(), nn.Flatten()), ["fuse_bn"], X)
    assert graphsel_meta(out).history[-1].modified is False


# --------------------------------------------------------------------------------------------
# Precision and memory format
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_traces_and_fuses_within_dtype_tolerance(dtype):
    model = make_net().to(dtype)
    x = X.to(dtype)
    try:
        with torch.no_grad():
            expected = model(x)
    except RuntimeError as e:  # no CPU kernel for this dtype on this build: graphsel must say so clearly
        with pytest.raises(ExampleInputError):
            graphsel.trace(model, x)
        pytest.skip(f"no CPU kernels for {dtype}: {e}")
    gm = graphsel.trace(model, x)
    assert graphsel_meta(gm).inputs[0].dtype == dtype
    out = graphsel.transform(model, ["fuse_bn"], x)
    row = graphsel_meta(out).history[-1]
    assert row.stats["fused"] == 2 and row.max_abs <= row.tolerance
    with torch.no_grad():
        got = out(x)
    assert got.dtype == dtype
    assert out[0].weight.dtype == dtype if isinstance(out, nn.Sequential) else out.get_submodule("0").weight.dtype == dtype
    scale = expected.float().abs().max().item()
    rtol, atol = graphsel.pipeline.verify.tolerance_for(dtype)
    assert (got.float() - expected.float()).abs().max().item() <= atol + rtol * scale


def test_channels_last_inputs_and_models():
    model = make_net().to(memory_format=torch.channels_last)
    x = X.contiguous(memory_format=torch.channels_last)
    out = graphsel.transform(model, ["fuse_bn"], x)
    meta = graphsel_meta(out)
    assert meta.inputs[0].channels_last
    # the random verification inputs keep the memory format
    ctx = graphsel.PassContext.for_graph(out)
    assert all(t[0].is_contiguous(memory_format=torch.channels_last) for t in ctx.verify_inputs())
    assert meta.history[-1].stats["fused"] == 2
    assert_same_function(model, out, x)
    assert "channels_last" in graphsel.report(out)


# --------------------------------------------------------------------------------------------
# Training mode
# --------------------------------------------------------------------------------------------
class PreActNet(nn.Module):
    """BN after a ReLU (pre-activation): fuse_bn cannot fold bn2, so it survives in the result."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.conv2(self.drop(F.relu(self.bn2(x))))


def test_a_training_mode_model_is_returned_in_training_mode_with_untouched_statistics():
    torch.manual_seed(0)
    model = PreActNet().train()
    with torch.no_grad():
        model.bn2.running_mean.uniform_(-1, 1)
    snap = model_snapshot(model)
    out = graphsel.transform(model, ["fuse_bn"], X)
    assert_model_unchanged(model, snap)
    assert out.training and all(m.training for m in out.modules())
    # bn2 survived; tracing, shape propagation and verification did not update its statistics.
    assert torch.equal(out.bn2.running_mean, model.bn2.running_mean)
    assert torch.equal(out.bn2.running_var, model.bn2.running_var)
    assert out.bn2.num_batches_tracked.item() == model.bn2.num_batches_tracked.item() == 0
    reference = copy.deepcopy(model).eval()
    assert_same_function(reference, out, X)
    # train mode still trains: dropout is active and BN uses batch statistics
    out(X)
    assert out.bn2.num_batches_tracked.item() == 1
    row = graphsel_meta(out).history[-1]
    assert any(d.level == "warning" and "training mode" in d.message for d in row.diagnostics)


def test_an_eval_mode_model_is_returned_in_eval_mode():
    out = graphsel.transform(make_net().eval(), ["fuse_bn"], X)
    assert not any(m.training for m in out.modules())


def test_a_mixed_mode_model_keeps_each_modules_mode():
    model = PreActNet().train()
    model.drop.eval()
    out = graphsel.transform(model, ["fuse_bn"], X)
    assert out.drop.training is False and out.bn2.training is True


# --------------------------------------------------------------------------------------------
# Untraceable models
# --------------------------------------------------------------------------------------------
class ShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if x.shape[-1] > 4:
            return self.conv(x)
        return x


def test_an_untraceable_submodule_is_specialised_through_transform():
    model = make_net()
    model.insert(3, ShapeBranch())
    model.eval()
    out = graphsel.transform(model, ["fuse_bn"], X)
    assert graphsel_meta(out).leafed == [] and "specialised" in graphsel.report(out)
    assert_same_function(model, out, X)


def test_an_untraceable_root_gives_a_trace_error():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            for row in x:  # iterating a tensor in the root forward
                if row.max() > 0:          # and branching on its values: no shape specialisation helps
                    x = x + row
            return self.conv(x)

    model = Root()
    snap = model_snapshot(model)
    with pytest.raises(TraceError) as info:
        graphsel.transform(model, ["fuse_bn"], X)
    assert "for row in x" in info.value.source_line
    assert "iterates" in info.value.remedy
    assert_model_unchanged(model, snap)


# --------------------------------------------------------------------------------------------
# Nothing to do
# --------------------------------------------------------------------------------------------
def test_a_model_with_nothing_to_fuse_is_a_reported_no_op():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    out = graphsel.transform(model, ["fuse_bn"], X)
    row = graphsel_meta(out).history[-1]
    assert row.modified is False and row.stats["fused"] == 0
    assert row.nodes_added == row.nodes_removed == 0
    assert [d.level for d in row.diagnostics] == ["info"]
    assert "nothing to fuse" in row.diagnostics[0].message
    assert "nothing to fuse" in graphsel.report(out)
    assert_same_function(model, out, X)


def test_batchnorms_that_cannot_be_fused_are_reported_as_skipped():
    model = PreActNet().eval()
    out = graphsel.transform(model, ["fuse_bn"], X)
    row = graphsel_meta(out).history[-1]
    assert row.stats == {"fused": 1, "skipped": 1}
    (skip,) = [d for d in row.diagnostics if d.level == "skip"]
    assert skip.where == "bn2" and "relu" in skip.message and "not Conv" in skip.message


def test_an_empty_pipeline_returns_the_traced_model():
    model = make_net()
    out = graphsel.transform(model, [], X)
    assert graphsel_meta(out).history == []
    assert "no passes run" in graphsel.report(out)
    assert_same_function(model, out, X)


def test_tuple_and_dict_outputs_are_verified():
    class Multi(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = make_net()

        def forward(self, x):
            y = self.body(x)
            return {"logits": y, "aux": (y * 2, y.argmax(1))}

    model = Multi().eval()
    out = graphsel.transform(model, ["fuse_bn"], X)
    with torch.no_grad():
        a, b = model(X), out(X)
    assert torch.allclose(a["logits"], b["logits"], atol=1e-5) and torch.equal(a["aux"][1], b["aux"][1])


def test_a_plain_torch_fx_graph_module_is_traced_again():
    model = make_net()
    plain = fx.symbolic_trace(model)
    out = graphsel.transform(plain, ["fuse_bn"], X)
    assert graphsel_meta(out).history[-1].stats["fused"] == 2
    assert_same_function(model, out, X)
