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
