"""DCP on residual models of torchvision and timm (random weights, no downloads, 32×32 inputs,
one tiny batch): residual blocks and candidate layers are found on the graph, auxiliary heads are
inserted and fitted, the first and the last candidate layer are pruned by greedy selection, and
fold_masks → materialize is verified against the mask oracle. A model without residual adds gets
the clear error."""
from __future__ import annotations

import pytest
import torch

import graphsel
from graphsel.passes import dcp
from graphsel.passes.dcp import DCPError
from strategies import randomize_norm_layers

torchvision = pytest.importorskip("torchvision")

# model: (blocks, stages) found on the graph
RESIDUAL = {
    "resnet18": (8, 4), "resnet50": (16, 4), "resnext50_32x4d": (16, 4), "wide_resnet50_2": (16, 4),
    "regnet_y_400mf": (16, 4), "mobilenet_v2": (10, 5), "efficientnet_b0": (9, 5), "convnext_tiny": (18, 4),
    "timm:resnet18": (8, 4),
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        model = timm.create_model(name[5:], pretrained=False, num_classes=10)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
    return randomize_norm_layers(model, torch.Generator().manual_seed(1)).eval()


def tiny_batch():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 3, 5, 9]))]


@pytest.mark.zoo
@pytest.mark.parametrize("name", list(RESIDUAL))
def test_dcp_runs_and_materializes_exactly(name):
    model = build(name)
    x = torch.randn(1, 3, 32, 32)
    gm = graphsel.trace(model, x)
    a = graphsel.analyze_channels(gm)
    structure = dcp.find_structure(gm, a)
    assert (len(structure.blocks), structure.stages) == RESIDUAL[name]
    layers, _ = dcp.candidate_layers(gm, a, structure, "block_internal")
    assert layers
    include = sorted({layers[0].module, layers[-1].module})
    options = {"ratio": 0.98, "data": tiny_batch(), "steps": 0, "head_iters": 3, "include": include,
               "progress": False}
    slim = graphsel.transform(model, [("dcp", options), "fold_masks", "materialize"], x, n_random_inputs=1)
    rows = {r.name: r for r in graphsel.graphsel_meta(slim).history}
    assert rows["dcp"].stats["layers"] == len(include)
    assert rows["dcp"].stats["heads"] == structure.heads_for("auto")
    assert rows["materialize"].max_abs is not None           # verified against the oracle
    if name.startswith(("resnext", "regnet")):
        # the pruned layer reads a grouped conv, whose output channels stay: zeroed columns remain
        assert rows["fold_masks"].stats["consumer_positions_remaining"] > 0
    else:
        assert rows["materialize"].params_after < rows["materialize"].params_before


@pytest.mark.zoo
def test_models_without_residual_blocks_get_the_clear_error():
    model = torchvision.models.get_model("densenet121", weights=None, num_classes=10).eval()
    with pytest.raises(DCPError, match="no residual blocks.*scope='all'"):
        graphsel.transform(model, [("dcp", {"data": tiny_batch()})], torch.randn(1, 3, 32, 32))
