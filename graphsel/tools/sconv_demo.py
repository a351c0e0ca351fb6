"""The selective-convolution section of ``graphsel demo`` (no data, no downloads, a few seconds).

A random-init DenseNet-40 (the paper's CIFAR net) gets selective convolutions (exact), one
dealloc → realloc round stands in for training (γ = 0.05: the paper's whole-schedule damage
budget in one call, so that something closes on random weights), and the static export —
``lower_selective_conv → fold_masks → materialize`` — gives a smaller dense graph equal to the
selective model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from graphsel.analysis.cost import cost
from graphsel.passes.selective_conv import allocation, dealloc, realloc
from graphsel.pipeline.phases import transform
from graphsel.pipeline.report import report
from graphsel.tools.models import densenet_cifar

DEMO_GAMMA = 0.05


def selective_convolution(out_dir: Path, log: Callable[[str], None]) -> dict:
    """Insert → dealloc/realloc → export on DenseNet-40; logs and returns a summary."""
    torch.manual_seed(0)
    model = densenet_cifar(40).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                     # trained-looking BatchNorm statistics (random init is the identity)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5, generator=g)
                m.bias.normal_(0, 0.5, generator=g)
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    x = torch.randn(2, 3, 32, 32, generator=g)
    log("")
    log("selective convolution: DenseNet-40 (CIFAR, random weights), insert → dealloc/realloc → export")
    gm = transform(model, ["insert_selective_conv"], (x,), progress=None)
    closed = sum(len(r.closed) for r in dealloc(gm, gamma=DEMO_GAMMA).values())
    reopened = sum(len(r.reallocated) for r in realloc(gm, generator=torch.Generator().manual_seed(2)).values())
    alloc = allocation(gm)
    copies = sum(a.copies for a in alloc)
    still_closed = sum(a.closed for a in alloc)
    log(f"  {len(alloc)} selective convs; one dealloc (γ={DEMO_GAMMA}) closed {closed} slots, realloc re-opened "
        f"{reopened} as shifted copies; {still_closed} stay closed")
    with torch.no_grad():
        y_selective = gm(x)
    slim = transform(gm, ["lower_selective_conv", "fold_masks", "materialize"], progress=None)
    with torch.no_grad():
        err = (slim(x) - y_selective).abs().max().item()
    before, after = cost(model, (x[:1],)), cost(slim, (x[:1],))
    log(f"  exported graph: params {before.params / 1e6:.3f}M → {after.params / 1e6:.3f}M, "
        f"MACs {before.macs / 1e6:.1f}M → {after.macs / 1e6:.1f}M; max |exported − selective| = {err:.1e}; "
        f"no SelectiveConv2d left: {not any(type(m).__name__ == 'SelectiveConv2d' for m in slim.modules())}")
    (out_dir / "selective_conv_report.txt").write_text(report(slim) + "\n", encoding="utf-8")
    return {"model": "densenet_cifar(40)", "selective_convs": len(alloc), "closed_by_dealloc": closed,
            "reopened_as_copies": reopened, "copies": copies, "closed": still_closed,
            "params": [before.params, after.params], "macs": [before.macs, after.macs], "max_abs_error": err}
