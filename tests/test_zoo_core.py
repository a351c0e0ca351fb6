"""Zoo tier: every torchvision classification model (random init, no download) traces with plain
graphsel.trace (no automatic leafing needed) and fuse_bn preserves its outputs, checked by the
pipeline's verification and independently against the original model.

BatchNorm statistics and affine parameters are randomised (torchvision initialises them to the
identity, which would make folding trivially exact). Inputs are as small as each model allows.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc

import pytest
import torch
import torch.nn as nn
import torchvision

import graphsel
from graphsel import graphsel_meta
from strategies import max_abs_difference, randomize_norm_layers

MODELS = torchvision.models.list_models(module=torchvision.models)

# Input size per model where 32×32 does not work; ViTs are built for a 2×2 patch grid.
INPUT_SIZE = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224}
BUILD_KWARGS = {name: {"image_size": 2 * int(name.rsplit("_", 1)[1])} for name in MODELS if name.startswith("vit_")}
for _name, _kw in BUILD_KWARGS.items():
    INPUT_SIZE[_name] = _kw["image_size"]

# Models over ~250M parameters need GBs per copy (the user's model, the traced copy and the pass's
# working copy are alive together): they run one after the other in a single test (so two xdist
# workers never hold two of them), the two largest (~640M parameters, ~10 GB peak in float32) in
# bfloat16. The other models are parametrized one per test, slowest first.
GIANTS = ("regnet_y_128gf", "vit_h_14", "vit_l_16", "vit_l_32")
BFLOAT16 = {"regnet_y_128gf", "vit_h_14"}
SLOWEST = ["convnext_large", "wide_resnet101_2", "maxvit_t", "efficientnet_v2_l", "efficientnet_b7",
           "regnet_x_32gf", "regnet_y_32gf"]
REGULAR = SLOWEST + [m for m in MODELS if m not in SLOWEST and m not in GIANTS]


def _release_memory() -> None:
    """Return freed heap pages to the OS (glibc keeps them after multi-GB models otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if name in BFLOAT16 else torch.float32)
    try:
        model = torchvision.models.get_model(name, weights=None, **BUILD_KWARGS.get(name, {}))
    finally:
        torch.set_default_dtype(default)
    randomize_norm_layers(model, torch.Generator().manual_seed(1))
    with torch.no_grad():  # ViT zero-initialises its head: outputs would be 0 and every check vacuous
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 0.02)
    return model.eval()


def test_the_zoo_has_all_classification_models():
    assert len(MODELS) == len(set(MODELS)) == 80
    assert sorted(REGULAR + list(GIANTS)) == sorted(MODELS)


def check_model(name: str) -> None:
    """graphsel.trace needs no automatic leafing; fuse_bn keeps the outputs (pipeline + independent check)."""
    with torch.no_grad():
        model = build(name)
        size = INPUT_SIZE.get(name, 32)
        dtype = torch.bfloat16 if name in BFLOAT16 else torch.float32
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2)).to(dtype)
        has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())

        out = graphsel.transform(model, ["fuse_bn"], x, n_random_inputs=1)
        meta = graphsel_meta(out)
        assert meta.leafed == [], f"{name} needed automatic leafing: {meta.leafed}"
        row = meta.history[-1]
        assert row.max_abs is not None and row.max_abs <= row.tolerance  # the pipeline's own check
        bn_calls_left = sum(1 for n in out.graph.nodes if n.op == "call_module"
                            and isinstance(out.get_submodule(n.target), nn.BatchNorm2d))
        assert bn_calls_left == row.stats["skipped"]  # every BN still called was reported as skipped
        assert sum(isinstance(m, nn.BatchNorm2d) for m in out.modules()) == bn_calls_left  # no dead BNs kept
        if has_bn:
            assert row.stats["fused"] > 0

        # Independent check on a fresh input: the returned module against the user's model.
        y = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3)).to(dtype)
        diff, scale = max_abs_difference(model, out, (y,))
        rtol, atol = graphsel.verify.tolerance_for(dtype)
        assert scale > 0 and diff <= atol + rtol * scale, f"{name}: max abs error {diff:.3g} at scale {scale:.3g}"
        del out, model
    _release_memory()


@pytest.mark.zoo
@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
@pytest.mark.parametrize("name", REGULAR)
def test_zoo_model_traces_and_fuse_bn_preserves_outputs(name):
    check_model(name)


@pytest.mark.zoo
def test_zoo_giants_trace_and_fuse_bn_preserves_outputs():
    failures = []
    for name in GIANTS:
        try:
            check_model(name)
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)
