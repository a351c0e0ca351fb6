"""Zoo tier, third-party models that used to fail (issue: the models users bring), at small inputs:
timm models caching attention biases after an eval forward (LeViT, EfficientViT), NFNets with
weight-standardised convolutions, NesT and CrossViT (shape-dependent forwards), EfficientFormer and
TinyViT; and the seven HuggingFace vision models of the issue from their default configs (EfficientNet's
is B7 at 600², the slowest case): each converts — prune 50 %
→ fold_masks → materialize, verified — and loses MACs. The full list at native sizes, with
HuggingFace transformers and Torch-Pruning beside, is ``benchmarks/zoo_sweep.py``."""
from __future__ import annotations

import pytest
import torch

import graphsel

CASES = {"levit_128s": 64, "efficientvit_m0": 64, "nf_resnet26": 64, "dm_nfnet_f0": 64, "nest_tiny": 64,
         "efficientformer_l1": 224, "tiny_vit_5m_224": 224, "crossvit_tiny_240": 240}
NATIVE = ("efficientformer_l1", "tiny_vit_5m_224", "crossvit_tiny_240")     # built at their own input size


@pytest.mark.zoo
@pytest.mark.parametrize("name", list(CASES))
def test_third_party_model_converts_after_an_eval_forward(name):
    timm = pytest.importorskip("timm")
    size = CASES[name]
    torch.manual_seed(0)
    kw = {} if name.startswith(("nf_", "dm_")) or name in NATIVE else {"img_size": size}
    model = timm.create_model(name, pretrained=False, **kw).eval()
    x = torch.randn(1, 3, size, size)
    model(x)                                             # as anyone does to check a model (fills caches)
    slim = graphsel.transform(model, [("prune", {"ratio": 0.5}), "fold_masks", "materialize"], x, n_random_inputs=1)
    assert graphsel.cost(slim, x).macs < 0.9 * graphsel.cost(model, x).macs


HF_DEFAULTS = ("ResNet", "ConvNext", "MobileNetV2", "EfficientNet", "RegNet", "ViT", "MobileViT")


@pytest.mark.zoo
@pytest.mark.parametrize("name", HF_DEFAULTS)
def test_huggingface_models_from_their_default_configs_convert(name):
    """The seven HuggingFace vision models of the issue, from their default configs (no download):
    transformed directly, verified, smaller, and still returning their ModelOutput."""
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, f"{name}Config")()
    torch.manual_seed(0)
    model = transformers.AutoModelForImageClassification.from_config(config).eval()
    size = getattr(config, "image_size", 224)
    x = torch.randn(1, 3, size, size)
    slim = graphsel.transform(model, [("prune", {"ratio": 0.5}), "fold_masks", "materialize"], x, n_random_inputs=1)
    assert type(slim(x)) is type(model(x))
    assert graphsel.cost(slim, x).macs < 0.9 * graphsel.cost(model, x).macs
