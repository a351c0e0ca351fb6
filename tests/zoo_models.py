"""The torchvision classification zoo as the zoo tests build it (random init, no download):
input sizes each model allows, ViTs built for a 2×2 patch grid, giants run one at a time,
randomised norm statistics (torchvision's identity init would make folding checks vacuous)."""
from __future__ import annotations

import contextlib
import ctypes
import gc

import torch
import torch.nn as nn
import torchvision

import graphsel
from strategies import randomize_norm_layers

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


def release_memory() -> None:
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




def dtype_of(name: str) -> torch.dtype:
    return torch.bfloat16 if name in BFLOAT16 else torch.float32


def example_input(name: str, seed: int) -> torch.Tensor:
    """A random 1×3×S×S input of the size and dtype the zoo tests use for ``name``."""
    size = INPUT_SIZE.get(name, 32)
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype_of(name))


def assert_within_tolerance(name: str, diff: float, scale: float) -> None:
    """``diff`` (max abs error) within graphsel's verification tolerance for the model's dtype."""
    rtol, atol = graphsel.pipeline.verify.tolerance_for(dtype_of(name))
    assert scale > 0 and diff <= atol + rtol * scale, f"{name}: max abs error {diff:.3g} at scale {scale:.3g}"
