"""The architecture strategy generates every construct it claims, and every model it generates
builds, runs and traces (with the construct visible in the traced graph)."""
from __future__ import annotations

import collections
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st

import graphsel
from strategies import (ALL_CONSTRUCTS, BLOCK_KINDS, Architecture, architectures, assert_model_unchanged,
                        assert_same_function, model_snapshot,
                        cnn_architectures, conv_nets_with_bn_relu_conv)


def _modules(gm, cls):
    return [gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), cls)]


def _calls(gm, *targets):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and n.target in targets]


def _shape(n):
    tm = n.meta.get("tensor_meta")
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _mul_operand_shapes(gm):
    out = []
    for n in _calls(gm, operator.mul, torch.mul, "mul"):
        for a in n.args:
            if isinstance(a, fx.Node) and _shape(a) is not None:
                out.append(_shape(a))
    return out


def _relu_evidence(gm, spelling):
    if spelling == "module":
        return any(not m.inplace for m in _modules(gm, nn.ReLU))
    if spelling == "module_inplace":
        return any(m.inplace for m in _modules(gm, nn.ReLU))
    if spelling == "functional":
        return any(not n.kwargs.get("inplace", False) for n in _calls(gm, F.relu))
    if spelling == "functional_inplace":
        return any(n.kwargs.get("inplace", False) for n in _calls(gm, F.relu))
    return bool(_calls(gm, {"torch": torch.relu, "torch_inplace": torch.relu_, "method": "relu",
                            "method_inplace": "relu_"}[spelling]))


# Facts about where an operand comes from, not visible as a node kind of their own.
NOT_CHECKED_IN_GRAPH = {"identity_shortcut", "projection_shortcut", "global_pool_head", "flatten_map"}


def evidence(construct: str, gm: fx.GraphModule) -> bool:
    """Whether the traced graph shows ``construct`` (an independent check of the strategy's labels)."""
    convs = _modules(gm, nn.Conv2d)
    if construct.startswith("relu_"):
        return _relu_evidence(gm, construct[len("relu_"):])
    checks = {
        "conv": lambda: bool(convs),
        "strided_conv": lambda: any(c.stride != (1, 1) for c in convs),
        "depthwise_conv": lambda: any(c.groups == c.in_channels > 1 for c in convs),
        "grouped_conv": lambda: any(1 < c.groups < c.in_channels for c in convs),
        "batchnorm": lambda: bool(_modules(gm, nn.modules.batchnorm._BatchNorm)),
        "dense_concat": lambda: bool(_calls(gm, torch.cat, torch.concat)),
        "se_multiply": lambda: any(len(s) == 4 and s[1] > 1 and s[2:] == (1, 1) for s in _mul_operand_shapes(gm)),
        "spatial_attention": lambda: any(len(s) == 4 and s[1] == 1 for s in _mul_operand_shapes(gm)),
        "channel_shuffle": lambda: bool(_calls(gm, torch.transpose, "transpose", "permute")) and any(
            len(_shape(n) or ()) == 5 for n in _calls(gm, "view", "reshape")),
        "chunk_branches": lambda: bool(_calls(gm, torch.chunk, "chunk")),
        "split_branches": lambda: bool(_calls(gm, torch.split, "split")),
        "channels_last_layernorm": lambda: bool(_modules(gm, nn.LayerNorm)) and bool(_calls(gm, "permute")),
        "layer_scale": lambda: any(n.op == "get_attr" for n in gm.graph.nodes),
        "dropout": lambda: bool(_modules(gm, (nn.Dropout, nn.Dropout2d))) or bool(_calls(gm, F.dropout)),
        "max_pool": lambda: bool(_modules(gm, nn.MaxPool2d)) or bool(_calls(gm, F.max_pool2d)),
        "avg_pool": lambda: bool(_modules(gm, nn.AvgPool2d)) or bool(_calls(gm, F.avg_pool2d)),
        "adaptive_pool": lambda: bool(_modules(gm, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))) or bool(
            _calls(gm, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)),
        "residual_add": lambda: bool(_calls(gm, operator.add, torch.add, "add")),
        "add_inplace": lambda: bool(_calls(gm, operator.add, operator.iadd)),
        "flatten_torch": lambda: bool(_calls(gm, torch.flatten)),
        "flatten_view": lambda: any(len(_shape(n) or ()) == 2 for n in _calls(gm, "view")),
        "flatten_method": lambda: bool(_calls(gm, "flatten")),
        "flatten_module": lambda: bool(_modules(gm, nn.Flatten)),
        "flatten_reshape": lambda: any(len(_shape(n) or ()) == 2 for n in _calls(gm, "reshape")),
        "linear_head": lambda: bool(_modules(gm, nn.Linear)),
        "linear_bn1d": lambda: bool(_modules(gm, nn.BatchNorm1d)),
        "no_head": lambda: len(_shape(next(iter(gm.graph.find_nodes(op="output"))).args[0]) or ()) == 4,
    }
    if construct in checks:
        return checks[construct]()
    if construct == "conv_multi_user":
        return any(len(n.users) > 1 for n in gm.graph.nodes if n.op == "call_module"
                   and isinstance(gm.get_submodule(n.target), nn.Conv2d))
    if construct in ("post_activation", "pre_activation"):
        pattern = (graphsel.Pattern(nn.Conv2d, nn.BatchNorm2d, "relu") if construct == "post_activation"
                   else graphsel.Pattern(nn.BatchNorm2d, "relu", graphsel.Optional("dropout"), nn.Conv2d))
        return bool(pattern.find(gm))
    raise AssertionError(f"no evidence check for construct '{construct}'")


def test_every_construct_is_generated_and_every_model_runs_and_traces():
    seen: collections.Counter = collections.Counter()
    missing_evidence: list[tuple[str, str]] = []

    @settings(max_examples=300, derandomize=True, phases=[Phase.generate], database=None)
    @given(architectures())
    def check(arch: Architecture):
        model = arch.build()
        x = arch.example_inputs()
        with torch.no_grad():
            y = model(*x)
        assert tuple(y.shape) == arch.out_shape
        assert torch.isfinite(y).all()
        gm = graphsel.trace(model, x)
        assert_same_function(model, gm, x)
        for c in arch.constructs - NOT_CHECKED_IN_GRAPH:
            if not evidence(c, gm):
                missing_evidence.append((c, repr(arch)))
        seen.update(arch.constructs)

    check()
    assert set(seen) <= ALL_CONSTRUCTS, f"undeclared constructs: {set(seen) - ALL_CONSTRUCTS}"
    missing = ALL_CONSTRUCTS - set(seen)
    assert not missing, f"never generated in 300 examples: {sorted(missing)}; counts: {dict(seen)}"
    assert not missing_evidence, f"construct labels not visible in the traced graph: {missing_evidence[:3]}"


@settings(max_examples=25)
@given(architectures())
def test_build_is_deterministic_and_leaves_global_rng_alone(arch):
    state = torch.get_rng_state()
    a, b = arch.build(), arch.build()
    assert torch.equal(state, torch.get_rng_state())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not a.training
    assert torch.equal(arch.example_inputs()[0], arch.example_inputs()[0])


@settings(max_examples=25)
@given(architectures(required=("dense",)))
def test_norm_layers_are_never_identities(arch):
    model = arch.build()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))


@settings(max_examples=40)
@given(st.data())
def test_restricted_strategies(data):
    cnn = data.draw(cnn_architectures())
    assert "channels_last_layernorm" not in cnn.constructs
    with_chain = data.draw(conv_nets_with_bn_relu_conv())
    assert "pre_activation" in with_chain.constructs
    kind = data.draw(st.sampled_from(BLOCK_KINDS))
    only = data.draw(architectures(kinds=(kind,), min_blocks=2, max_blocks=2, head=False))
    assert "no_head" in only.constructs and len(only.blocks) == 3  # stem + 2 blocks


def test_repr_lists_every_block():
    a = find(architectures(min_blocks=3), lambda a: "dense_concat" in a.constructs and a.head is not None)
    text = repr(a)
    assert "Dense(" in text and "head:" in text and f"features.{len(a.blocks) - 1}:" in text


def test_unknown_block_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown block kinds"):
        architectures(kinds=("conv", "transformer"))


@pytest.mark.parametrize("change", ["stride", "padding", "dropout_p", "bn_eps", "new_attribute", "cached_tensor",
                                    "parameter_value", "requires_grad", "buffer_dtype"])
def test_model_snapshot_compares_values_not_names(change):
    """The "user's model is untouched" checks see a changed setting, not only a renamed one."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    model.cache = torch.zeros(2)
    snap = model_snapshot(model)
    assert_model_unchanged(model, snap)
    with torch.no_grad():
        {"stride": lambda: setattr(model[0], "stride", (2, 2)),
         "padding": lambda: setattr(model[0], "padding", (1, 1)),
         "dropout_p": lambda: setattr(model[2], "p", 0.1),
         "bn_eps": lambda: setattr(model[1], "eps", 1e-3),
         "new_attribute": lambda: setattr(model[0], "extra", 1),
         "cached_tensor": lambda: model.cache.add_(1),
         "parameter_value": lambda: model[0].weight.view(-1)[0].add_(1e-6),
         "requires_grad": lambda: model[0].bias.requires_grad_(False),
         "buffer_dtype": lambda: setattr(model[1], "running_mean", model[1].running_mean.double())}[change]()
    with pytest.raises(AssertionError):
        assert_model_unchanged(model, snap)


@settings(max_examples=15)
@given(architectures(width_multiple=4, kinds=("conv", "preact")))
def test_width_multiple_draws_multiples(arch):
    """Every width the strategy chooses is a multiple of width_multiple: in chains of standard
    conv units, every output width (depthwise units keep their input's, a multiple too)."""
    model = arch.build()
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths and all(c % 4 == 0 for c in widths)
