"""graphsel.trace: outputs kept, the user's model never touched, automatic leafing, clear errors."""
from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import graphsel
from graphsel import TraceError, graphsel_meta
from strategies import assert_model_unchanged, assert_same_function, model_snapshot


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.drop(x + self.conv2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------------------------
# Outputs and the user's model
# --------------------------------------------------------------------------------------------
def test_trace_preserves_outputs_of_a_torchvision_model():
    import torchvision
    model = torchvision.models.resnet18(num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = graphsel.trace(model, x)
    assert isinstance(gm, fx.GraphModule)
    assert_same_function(model, gm, x)
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op != "output")


def test_trace_never_touches_the_users_model():
    model = SmallNet().train()
    model.bn1.eval()  # mixed flags must survive too
    calls = []
    model.conv1.register_forward_hook(lambda m, i, o: calls.append("fwd"))
    model.fc.register_forward_pre_hook(lambda m, i: calls.append("pre"))
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
    snap = model_snapshot(model)
    gm = graphsel.trace(model, torch.randn(2, 3, 8, 8))
    assert_model_unchanged(model, snap)
    # Returned in the user's (mixed) modes, module by module.
    for name, m in model.named_modules():
        if name:
            assert gm.get_submodule(name).training == m.training, name
    assert gm.training is True


def test_traced_modules_and_tensors_are_not_shared_with_the_users_model():
    model = SmallNet()
    gm = graphsel.trace(model, torch.randn(1, 3, 8, 8))
    user_modules = {id(m) for m in model.modules()}
    assert not user_modules & {id(m) for m in gm.modules()}
    user_storage = {t.untyped_storage().data_ptr() for t in model.state_dict().values() if t.numel()}
    traced_storage = {t.untyped_storage().data_ptr() for t in gm.state_dict().values() if t.numel()}
    assert not user_storage & traced_storage
    with torch.no_grad():  # editing the traced module leaves the user's model alone
        gm.conv1.weight.zero_()
    assert model.conv1.weight.abs().sum() > 0


def test_hooks_on_leaf_modules_stay_in_effect():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 1))).eval()
    model[0].register_forward_hook(lambda m, i, o: o * 2)
    model[2].register_forward_pre_hook(lambda m, i: (i[0] + 1,))
    x = torch.randn(1, 3, 8, 8)
    gm = graphsel.trace(model, x)
    assert_same_function(model, gm, x)


# --------------------------------------------------------------------------------------------
# Training mode
# --------------------------------------------------------------------------------------------
class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return F.dropout(self.conv(x), 0.5, self.training)


def test_a_training_mode_model_is_traced_with_eval_semantics_and_a_note():
    model = FunctionalDropout().train()
    x = torch.randn(2, 3, 8, 8)
    gm = graphsel.trace(model, x)
    assert gm.training and model.training
    assert_same_function(model, gm, x)  # compared in eval mode: no dropout in either
    assert any("self.training" in note for note in graphsel_meta(gm).notes)
    assert "self.training" in graphsel.report(gm)
    # An eval-mode model needs no note, and a model without train-only code gets none either.
    assert not any("self.training" in note for note in graphsel_meta(graphsel.trace(model.eval(), x)).notes)
    assert not any("self.training" in note for note in graphsel_meta(graphsel.trace(SmallNet().train(),
                                                                                     x)).notes)


# --------------------------------------------------------------------------------------------
# Automatic leafing
# --------------------------------------------------------------------------------------------
class ShapeIf(nn.Module):
    """Branches on the input's shape (timm's pad-same style)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if x.shape[-1] % 2 == 1:
            y = F.pad(y, (0, 1))[..., :-1]
        return y * 2


class IntCast(nn.Module):
    """int() of a shape expression."""

    def forward(self, x):
        h = int(x.shape[2] / 2)
        return torch.cat([x[:, :, :h], x[:, :, h:]], dim=2) + 1


class ForOverTensor(nn.Module):
    """Iterates over the batch."""

    def forward(self, x):
        return torch.stack([t * 3 for t in x])


class Outer(nn.Module):
    """Traceable itself; only its IntCast child is not."""

    def __init__(self, c):
        super().__init__()
        self.pre = nn.Conv2d(c, c, 1)
        self.inner = IntCast()

    def forward(self, x):
        return self.inner(self.pre(x)) - x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.shape_if = ShapeIf(6)
        self.outer = Outer(6)
        self.loop = ForOverTensor()
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(self.loop(self.outer(self.shape_if(self.stem(x)))))


class DataIf(nn.Module):
    """Branches on the tensor's values: no shape specialisation can trace it."""

    def forward(self, x):
        return x * 2 if x.mean() > 0 else x - 1


class ValueDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.gate = DataIf()
        self.outer = Outer(6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(self.outer(self.gate(self.stem(x))))


def test_shape_dependent_submodules_are_traced_specialised_not_leafed():
    """Code that reads the input's shape (branches, int(), loops over the batch) traces once the
    shapes are known: specialised to the example inputs, recorded, nothing made opaque."""
    model = Untraceable().eval()
    x = torch.randn(2, 3, 9, 7)
    with pytest.raises(Exception):
        fx.symbolic_trace(copy.deepcopy(model))  # plain torch.fx cannot trace it
    gm = graphsel.trace(model, x)
    assert graphsel_meta(gm).leafed == []
    assert any("specialised to 2×3×9×7" in n for n in graphsel_meta(gm).notes)
    assert_same_function(model, gm, x)
    assert "specialised" in graphsel.report(gm)


def test_untraceable_submodules_are_auto_leafed_and_recorded():
    """Without example inputs nothing can be specialised: the innermost failing modules become
    opaque leaves (as they do for value-dependent code, below)."""
    model = Untraceable().eval()
    x = torch.randn(2, 3, 9, 7)
    gm = graphsel.trace(model)
    assert_same_function(model, gm, x)
    leafed = {r.path: r for r in graphsel_meta(gm).leafed}
    assert set(leafed) == {"shape_if", "outer.inner", "loop"}  # the innermost failing modules only
    assert leafed["shape_if"].cls == "ShapeIf" and "control flow" in leafed["shape_if"].reason
    assert "Proxy" in leafed["outer.inner"].reason or "int" in leafed["outer.inner"].reason
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"shape_if", "outer.inner", "loop", "outer.pre", "stem", "head"} <= called
    text = graphsel.report(gm)
    for path in leafed:
        assert f"leafed '{path}'" in text


def test_value_dependent_submodules_are_auto_leafed_even_with_example_inputs():
    model = ValueDependent().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = graphsel.trace(model, x)
    assert [r.path for r in graphsel_meta(gm).leafed] == ["gate"]     # outer.inner specialised, gate leafed
    assert_same_function(model, gm, x)


class _OutOfMemoryBlock(nn.Module):
    def forward(self, x):
        raise MemoryError("simulated: no memory left while tracing")


def test_memory_errors_while_tracing_propagate_instead_of_leafing_the_module():
    """Auto-leafing is for code torch.fx cannot follow; running out of memory is not such code."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _OutOfMemoryBlock()).eval()
    with pytest.raises(MemoryError, match="simulated"):
        graphsel.trace(model)


def test_root_level_failure_names_path_line_and_remedy():
    class RootBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent branch in the root forward
                return self.conv(x)
            return x

    with pytest.raises(TraceError) as info:
        graphsel.trace(RootBranch(), torch.randn(1, 3, 4, 4))
    err = info.value
    assert err.module_path == ""
    assert "test_tracing.py" in err.source_line and "if x.sum() > 0" in err.source_line
    assert "concrete_args" in err.remedy and "leaf_modules" in err.remedy
    assert "<root model>" in str(err) and "fix:" in str(err)


def test_explicit_leaves_are_not_reported_as_auto_leafed():
    model = Untraceable().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = graphsel.trace(model, leaf_modules=["outer.inner"])
    assert {r.path for r in graphsel_meta(gm).leafed} == {"shape_if", "loop"}
    assert "outer.inner" in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert_same_function(model, gm, x)


def test_max_auto_leaves_gives_a_trace_error_naming_the_module():
    with pytest.raises(TraceError) as info:
        graphsel.trace(Untraceable().eval(), max_auto_leaves=1)
    assert info.value.module_path in {"outer.inner", "loop"}
    assert "leaf_modules=['" in info.value.remedy


# --------------------------------------------------------------------------------------------
# leaf_modules, concrete_args, buffers, caches
# --------------------------------------------------------------------------------------------
def test_leaf_modules_by_class_and_by_path():
    model = Untraceable().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = graphsel.trace(model, x, leaf_modules=[Outer, "shape_if", ForOverTensor])
    assert graphsel_meta(gm).leafed == []  # nothing left to auto-leaf
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"outer", "shape_if", "loop"} <= called and "outer.pre" not in called
    assert_same_function(model, gm, x)


@pytest.mark.parametrize("bad, error", [(["nope"], ValueError), ([3], TypeError), ([torch.relu], TypeError)])
def test_bad_leaf_modules_are_rejected(bad, error):
    with pytest.raises(error):
        graphsel.trace(SmallNet(), torch.randn(1, 3, 8, 8), leaf_modules=bad)


class Flip(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, flip: bool = False, scale=None):
        y = self.conv(x)
        if flip:
            y = y.flip(-1)
        if scale is not None:
            y = y * scale
        return y


def test_concrete_args_specialise_flag_arguments():
    model = Flip().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TraceError) as info:
        graphsel.trace(model)                          # no example inputs: nothing to fix them against
    assert "concrete_args={'flip': False, 'scale': None}" in info.value.remedy
    gm = graphsel.trace(model, x)                      # with them: the flags are fixed to their defaults
    assert "flip=False, scale=None" in graphsel_meta(gm).notes[-1]
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x))
    gm = graphsel.trace(model, x, concrete_args={"flip": True, "scale": 3.0})
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x, flip=True, scale=3.0))
        assert not torch.allclose(gm(x), model(x))
    # and the pipeline runs on such a graph (its inputs are the tensors alone)
    out = graphsel.transform(model, ["fuse_bn"], x, concrete_args={"flip": True, "scale": 3.0})
    with torch.no_grad():
        assert torch.allclose(out(x), model(x, flip=True, scale=3.0))


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("offset", torch.full((4,), 0.5))
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        self.count.add_(1)
        if self.offset.shape[0] == 4:  # a branch on a buffer's shape resolves at trace time
            x = self.conv(x) + self.offset.view(1, -1, 1, 1)
        return x


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.counter = Counter()

    def forward(self, x):
        return self.counter(x)


def test_inplace_buffer_update_is_recorded_not_executed():
    model = Wrapper()
    gm = graphsel.trace(model, torch.randn(1, 3, 4, 4))
    assert graphsel_meta(gm).leafed == []  # buffers are proxied without breaking the module
    assert model.counter.count.item() == 0  # not executed on the user's model
    assert any(n.op == "call_method" and n.target == "add_" for n in gm.graph.nodes)
    before = gm.counter.count.item()
    gm(torch.randn(1, 3, 4, 4))
    gm(torch.randn(1, 3, 4, 4))
    assert gm.counter.count.item() == before + 2


class CachedBias(nn.Module):
    """LeViT's pattern: in eval mode a bias is computed once and cached in a dict keyed by device."""

    def __init__(self, c=4, n=6):
        super().__init__()
        self.biases = nn.Parameter(torch.randn(c, n))
        self.register_buffer("idx", torch.randint(0, n, (n, n)))
        self.cache: dict[str, torch.Tensor] = {}

    def get_bias(self, device):
        if self.training:
            return self.biases[:, self.idx]
        key = str(device)
        if key not in self.cache:
            self.cache[key] = self.biases[:, self.idx]
        return self.cache[key]

    def forward(self, x):  # x: N x c x n x n
        return x + self.get_bias(x.device)


class CachedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = CachedBias()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(self.attn(x))


def test_module_caching_tensors_in_a_dict_traces_correctly_twice():
    model = CachedNet().eval()
    x = torch.randn(2, 4, 6, 6)
    # Without the deep copy, the second trace reuses a proxy cached by the first (the hazard):
    naive = copy.deepcopy(model)
    fx.symbolic_trace(naive)
    with pytest.raises(Exception):
        fx.symbolic_trace(naive)(x)
    g1 = graphsel.trace(model, x)
    g2 = graphsel.trace(model, x)
    assert_same_function(model, g1, x)
    assert_same_function(model, g2, x)
    assert all(isinstance(v, torch.Tensor) and not isinstance(v, fx.Proxy) for v in model.attn.cache.values())


# --------------------------------------------------------------------------------------------
# timm models that need automatic leafing
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name, expected_leaf_class", [("tf_efficientnet_b0", "Conv2dSame"),
                                                       ("efficientvit_b0", "LiteMLA")])
def test_timm_models_trace_with_auto_leafing(name, expected_leaf_class):
    """With example inputs the shape-dependent modules are specialised (nothing opaque); without,
    they are auto-leafed."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(Exception):
        fx.symbolic_trace(copy.deepcopy(model))
    assert {r.cls for r in graphsel_meta(graphsel.trace(model)).leafed} == {expected_leaf_class}
    gm = graphsel.trace(model, x)
    assert graphsel_meta(gm).leafed == [] and "specialised" in graphsel_meta(gm).notes[-1]
    assert_same_function(model, gm, x)
    assert_same_function(model, gm, (torch.randn(2, 3, 64, 64),))


# --------------------------------------------------------------------------------------------
# Inferred example inputs
# --------------------------------------------------------------------------------------------
def test_example_inputs_are_inferred_for_image_classifiers():
    model = SmallNet()
    gm = graphsel.trace(model)
    meta = graphsel_meta(gm)
    (x,) = graphsel.ir.tracing.example_inputs_of(gm)
    assert x.shape[:2] == (1, 3) and x.dim() == 4
    assert meta.inputs[0].shape == tuple(x.shape)
    assert any("inferred" in n for n in meta.notes) and "inferred" in graphsel.report(gm)
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op != "output")


def test_inferred_inputs_skip_sizes_the_model_cannot_take():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 26 * 26, 3))  # 28x28 only
    gm = graphsel.trace(model)
    assert graphsel_meta(gm).inputs[0].shape == (1, 1, 28, 28)


def test_inferred_inputs_for_an_mlp():
    gm = graphsel.trace(nn.Sequential(nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert graphsel_meta(gm).inputs[0].shape == (1, 12)


def test_inference_is_refused_for_models_with_several_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, a, b):
            return self.conv(a) + b

    with pytest.raises(graphsel.ExampleInputError, match="2 inputs"):
        graphsel.trace(Two())
    gm = graphsel.trace(Two(), (torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)))
    assert len(graphsel_meta(gm).inputs) == 2


def test_trace_records_its_time():
    t0 = time.perf_counter()
    gm = graphsel.trace(SmallNet(), torch.randn(1, 3, 8, 8))
    assert 0 < graphsel_meta(gm).trace_seconds <= time.perf_counter() - t0
