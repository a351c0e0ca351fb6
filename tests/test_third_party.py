"""The models users bring: what real third-party forwards do to a model copy and to tracing —
caches of tensors derived under autograd, hooks, objects that cannot be copied — and layers
from outside torch.nn (timm's weight-standardised convolutions)."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import graphsel
from strategies import architectures, assert_model_unchanged, assert_same_function, model_snapshot


class CachedBias(nn.Module):
    """Like LeViT's attention-bias cache: an eval forward stores a tensor derived from a
    parameter (under autograd) in a dict, and rebuilds it when the entry is missing."""

    def __init__(self, c: int):
        super().__init__()
        self.bias_table = nn.Parameter(torch.randn(c))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        if self.training:
            return x + self.bias_table[None, :, None, None]
        if "b" not in self.cache:
            self.cache["b"] = self.bias_table[None, :, None, None] * 1.0
        return x + self.cache["b"]


class Planted(nn.Module):
    """A generated net with a cache, a derived tensor attribute, hooks, a lock and a lambda."""

    def __init__(self, inner: nn.Module, c: int):
        super().__init__()
        self.inner = inner
        self.cached = CachedBias(c)
        self.lock = threading.Lock()                                   # cannot be deep-copied
        self.scale_fn = lambda t: t * 1.0
        self.derived = self.cached.bias_table * 2                       # a non-leaf attribute
        self.calls = 0
        inner.register_forward_hook(lambda m, i, o: None)

    def forward(self, x):
        return self.inner(self.scale_fn(self.cached(x)))


@settings(max_examples=15)
@given(arch=architectures(kinds=("conv", "residual", "preact")), warm=st.booleans())
def test_copy_and_trace_survive_what_models_hold(arch, warm):
    x = arch.example_inputs()
    model = Planted(arch.build(), x[0].shape[1]).eval()
    if warm:
        model(*x)                                                       # fills the cache under autograd
    snap = model_snapshot(model)
    gm = graphsel.trace(model, x)
    graphsel.transform(model, [("prune", {"ratio": 0.3}), "fold_masks", "materialize"], x)   # verified
    assert_model_unchanged(model, snap)
    assert_same_function(model, gm, x)


def test_timm_models_that_cache_attention_biases_convert_after_an_eval_forward():
    timm = pytest.importorskip("timm")
    model = timm.create_model("levit_128s", pretrained=False, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    model(x)                                  # as anyone does to check a model: caches non-leaf tensors
    slim = graphsel.transform(model, [("prune", {"ratio": 0.5}), "fold_masks", "materialize"], x)
    assert graphsel.cost(slim, x).macs < graphsel.cost(model, x).macs


# -- weight-standardised convolutions ------------------------------------------------------------

def _nf_net(scaled: bool):
    timm = pytest.importorskip("timm")
    from timm.layers.std_conv import ScaledStdConv2d, StdConv2d
    conv = ScaledStdConv2d if scaled else StdConv2d

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv(3, 8, 3, padding=1)
            self.b = conv(8, 8, 3, padding=1)
            self.c = conv(8, 4, 1)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    net = Net().eval()
    if scaled:
        with torch.no_grad():
            for m in net.modules():
                if hasattr(m, "gain"):
                    m.gain.uniform_(0.5, 1.5)
    assert timm
    return net


@pytest.mark.parametrize("scaled", [False, True])
def test_weight_standardised_convs_prune_exactly(scaled):
    """Output channels slice with the layer staying weight-standardised; a layer that loses input
    channels becomes a plain conv with its standardised weight (verified by the pipeline and here
    against the model with the removed filters zeroed)."""
    model = _nf_net(scaled)
    x = (torch.randn(2, 3, 8, 8),)
    pruned = graphsel.transform(model, [("prune", {"ratio": 0.5, "scope": "uniform"})], x)
    removed = {k: sorted(v) for k, v in graphsel.get_masks(pruned).removed.items()}
    assert set(removed) == {"a", "b"}
    slim = graphsel.transform(pruned, ["fold_masks", "materialize"])
    assert slim.a.out_channels == 4 and slim.b.in_channels == 4
    assert type(slim.a).__name__ in ("StdConv2d", "ScaledStdConv2d")        # outputs only: still WS
    assert type(slim.b) is nn.Conv2d                                           # inputs sliced: frozen
    from graphsel.ops.conv import standardized_weight
    ref = _nf_net(scaled)
    with torch.no_grad():                       # the same function: removed filters give zero after ReLU
        for name, pos in removed.items():
            m = getattr(ref, name)
            plain = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding,
                              bias=m.bias is not None)
            plain.weight.copy_(standardized_weight(m))
            plain.weight[pos] = 0
            if m.bias is not None:
                plain.bias.copy_(m.bias)
                plain.bias[pos] = 0
            setattr(ref, name, plain)
    assert_same_function(ref, slim, x)


def test_fold_weight_std_is_exact_and_leaves_plain_convs():
    model = _nf_net(True)
    x = (torch.randn(2, 3, 8, 8),)
    gm = graphsel.transform(model, ["fold_weight_std"], x)
    assert all(type(m) is nn.Conv2d for m in (gm.a, gm.b, gm.c))
    assert graphsel.graphsel_meta(gm).history[-1].stats["folded"] == 3
    assert_same_function(model, gm, x)


# -- forwards that branch on input shapes, optional arguments, dataclass outputs ---------------------

class ShapeBranching(nn.Module):
    """Like CrossViT / NesT: the root forward and a submodule read the input's shape as Python values."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(2))
        self.head = nn.Linear(8, 4)

    def forward(self, x, scale: float | None = None, return_features: bool = False):
        B, C, H, W = x.shape
        if H != 16:                                           # the root branches on the input size
            x = nn.functional.interpolate(x, size=(16, 16))
        x = self.stem(x)
        for i in range(x.shape[1] // 4):                      # a loop whose length is a shape
            x = torch.relu(self.blocks[i](x))
        if scale is not None:
            x = x * scale
        f = x.mean((2, 3))
        return (self.head(f), f) if return_features else self.head(f)


def test_a_forward_branching_on_shapes_is_traced_specialised_and_reported():
    model = ShapeBranching().eval()
    x = (torch.randn(2, 3, 12, 12),)
    with pytest.raises(graphsel.TraceError):
        graphsel.trace(model)                                 # no example inputs: no shapes to specialise to
    gm = graphsel.trace(model, x)
    note = graphsel.graphsel_meta(gm).notes[-1]
    assert "specialised to 2×3×12×12" in note and "scale=None" in note and "return_features=False" in note
    assert_same_function(model, gm, x)
    slim = graphsel.transform(model, [("prune", {"ratio": 0.5}), "fold_masks", "materialize"], x)
    assert slim.stem.out_channels < 8 and "specialised" in graphsel.report(slim)


def test_a_data_dependent_branch_is_still_refused():
    class DataBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return y if y.sum() > 0 else -y                     # a branch on values, not shapes
    with pytest.raises(graphsel.TraceError):
        graphsel.trace(DataBranch().eval(), torch.randn(1, 3, 4, 4))


def _hf_models():
    transformers = pytest.importorskip("transformers")
    T = transformers
    return {
        "resnet": T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3),
        "convnext": T.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3),
        "vit": T.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           image_size=16, patch_size=8, num_labels=3),
    }


@pytest.mark.parametrize("name", ["resnet", "convnext", "vit"])
def test_huggingface_image_classifiers_convert_directly_and_keep_their_output_type(name):
    transformers = pytest.importorskip("transformers")
    config = _hf_models()[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForImageClassification.from_config(config).eval()
    x = torch.randn(1, 3, getattr(config, "image_size", 32), getattr(config, "image_size", 32))
    slim = graphsel.transform(model, [("prune", {"ratio": 0.5}), "fold_masks", "materialize"], x)   # verified
    out, ref = slim(x), model(x)
    assert type(out) is type(ref) and out.logits.shape == ref.logits.shape
    assert graphsel.cost(slim, x).macs < graphsel.cost(model, x).macs


# -- what verification cannot judge ------------------------------------------------------------------

def test_non_finite_weights_inputs_and_outputs_are_refused_with_the_tensor_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(graphsel.GraphselError, match=r"'0\.weight' holds 1 NaN"):
        graphsel.transform(model, [("prune", {"ratio": 0.5})], x)
    graphsel.transform(model, ["fuse_bn"], x, check_finite=False)            # the documented opt-out
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = 1.0
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(graphsel.GraphselError, match="example input 0 holds 1 non-finite"):
        graphsel.transform(model, ["fuse_bn"], bad)
    overflow = nn.Sequential(nn.Conv2d(3, 2, 1)).eval()
    with torch.no_grad():
        overflow[0].weight.fill_(3e38)
    with pytest.raises(graphsel.GraphselError, match="output 0 is not finite"):
        graphsel.transform(overflow, ["fuse_bn"], x)


def test_a_model_on_the_meta_device_gets_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).to("meta")
    x = torch.randn(1, 3, 8, 8, device="meta")
    with pytest.raises(graphsel.GraphselError, match="meta device.*graphsel.cost.*verify=False"):
        graphsel.transform(model, ["fuse_bn"], x)
    # without verification, graph-only passes run on meta (the SConv zoo test searches patterns so);
    # one that needs data is a PassError, never a raw exception
    gm = graphsel.transform(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to("meta"), ["fuse_bn"], x, verify=False)
    assert all(t.device.type == "meta" for t in gm.parameters())
    two = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).to("meta")
    with pytest.raises(graphsel.PassError, match="prune"):       # scores need data
        graphsel.transform(two, [("prune", {"ratio": 0.5}), "fold_masks", "materialize"], x, verify=False)


def test_a_huggingface_model_round_trips_through_a_safe_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.AutoModelForImageClassification.from_config(_hf_models()["resnet"]).eval()
    x = torch.randn(1, 3, 32, 32)
    slim = graphsel.transform(model, [("prune", {"ratio": 0.5}), "fold_masks", "materialize"], x)
    graphsel.save(slim, tmp_path / "m.graphsel")
    back = graphsel.load_model(tmp_path / "m.graphsel")
    out, ref = back(x), slim(x)
    assert type(out) is type(ref) and torch.equal(out.logits, ref.logits)
