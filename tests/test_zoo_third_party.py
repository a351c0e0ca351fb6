"""Zoo tier, third-party models that used to fail (issue: the models users bring), at small inputs:
timm models caching attention biases after an eval forward (LeViT, EfficientViT), NFNets with
weight-standardised convolutions, NesT (shape-dependent submodules): each converts — prune 50 %
→ fold_masks → materialize, verified — and loses MACs. The full list at native sizes, with
HuggingFace transformers and Torch-Pruning beside, is ``benchmarks/zoo_sweep.py``."""
from __future__ import annotations

import pytest
import torch

import graphsel

CASES = {"levit_128s": 64, "efficientvit_m0": 64, "nf_resnet26": 64, "dm_nfnet_f0": 64, "nest_tiny": 64}


@pytest.mark.zoo
@pytest.mark.parametrize("name", list(CASES))
def test_third_party_model_converts_after_an_eval_forward(name):
    timm = pytest.importorskip("timm")
    size = CASES[name]
    torch.manual_seed(0)
    kw = {} if name.startswith(("nf_", "dm_")) else {"img_size": size}
    model = timm.create_model(name, pretrained=False, **kw).eval()
    x = torch.randn(1, 3, size, size)
    model(x)                                             # as anyone does to check a model (fills caches)
    slim = graphsel.transform(model, [("prune", {"ratio": 0.5}), "fold_masks", "materialize"], x, n_random_inputs=1)
    assert graphsel.cost(slim, x).macs < 0.9 * graphsel.cost(model, x).macs
