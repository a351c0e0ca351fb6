"""Contract verification: compare a graph's outputs before and after a pass.

The reference semantics of a graph is its eval-mode forward, or, when it carries channel masks,
the mask oracle of :mod:`graphsel.masks` (removed channels forced to zero). Tolerances depend
on the output dtype; the error is measured relative to the largest reference output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from graphsel.analysis.masks import has_masks
from graphsel.pipeline.oracle import oracle_forward, oracle_interpreter

TOLERANCES = {  # dtype: (rtol, atol) — error allowed = atol + rtol * max|reference|
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (4e-2, 1e-2),
}


def tolerance_for(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES.get(dtype, (1e-4, 1e-5))


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Tensors of a (possibly nested) model output, in a stable order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in flatten_outputs(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    return []


class eval_mode:
    """Context manager: put every submodule in eval mode, restore each one's flag afterwards."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        return self.module

    def __exit__(self, *exc):
        for m, t in self.flags:
            m.training = t
        return False


def reference_forward(gm: nn.Module, inputs: tuple, ctx=None) -> list[torch.Tensor]:
    """Outputs under reference semantics (eval mode, no grad, masks applied when present;
    ``ctx``: the pipeline's context, whose cache the oracle uses)."""
    with torch.no_grad(), eval_mode(gm):
        if isinstance(gm, fx.GraphModule) and has_masks(gm):
            out = oracle_forward(gm, inputs, ctx)
        else:
            out = gm(*inputs)
    return [t.detach() for t in flatten_outputs(out)]


@dataclass
class Deviation:
    max_abs: float
    max_rel: float
    tolerance: float
    shapes_match: bool = True
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.shapes_match and self.max_abs <= self.tolerance


def compare_outputs(ref: list[list[torch.Tensor]], got: list[list[torch.Tensor]],
                    rtol: float | None = None, atol: float | None = None) -> Deviation:
    """Worst deviation over several inputs' output lists."""
    max_abs, scale, tol = 0.0, 0.0, 0.0
    for r_list, g_list in zip(ref, got):
        if len(r_list) != len(g_list):
            return Deviation(math.inf, math.inf, 0.0, False, f"{len(r_list)} outputs became {len(g_list)}")
        for i, (r, g) in enumerate(zip(r_list, g_list)):
            if r.shape != g.shape:
                return Deviation(math.inf, math.inf, 0.0, False,
                                 f"output {i} changed shape from {tuple(r.shape)} to {tuple(g.shape)}")
            if not r.is_floating_point():
                if not torch.equal(r, g):
                    return Deviation(math.inf, math.inf, 0.0, True, f"integer output {i} changed")
                continue
            rt, at = tolerance_for(r.dtype)
            rt, at = rtol if rtol is not None else rt, atol if atol is not None else at
            r64, g64 = r.double(), g.double()
            finite = torch.isfinite(r64) & torch.isfinite(g64)
            if not torch.equal(torch.isfinite(r64), torch.isfinite(g64)) or not torch.equal(
                    r64[~finite].nan_to_num(0), g64[~finite].nan_to_num(0)):
                return Deviation(math.inf, math.inf, 0.0, True, f"output {i}: non-finite values differ")
            s = r64[finite].abs().max().item() if finite.any() else 0.0
            d = (r64[finite] - g64[finite]).abs().max().item() if finite.any() else 0.0
            max_abs = max(max_abs, d)
            scale = max(scale, s)
            tol = max(tol, at + rt * s)
    return Deviation(max_abs, max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf), tol)


def capture_node_outputs(gm: fx.GraphModule, inputs: tuple, ctx=None) -> dict[str, torch.Tensor]:
    """Every node's tensor output (reference semantics), keyed by node name."""
    with torch.no_grad(), eval_mode(gm):
        interp = oracle_interpreter(gm, ctx) if has_masks(gm) else _CapturingInterpreter(gm)
        interp.run(*inputs)
    return interp.captured


class _CapturingInterpreter(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.captured: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.captured[n.name] = out.detach()
        return out


def first_divergence(before: fx.GraphModule, after: fx.GraphModule, inputs: tuple,
                     rtol: float | None = None, atol: float | None = None, ctx=None) -> tuple[str | None, str]:
    """The first node (in the order of ``after``) present in both graphs with the same output shape
    whose value differs beyond tolerance; ``(None, "")`` when none does."""
    try:
        a = capture_node_outputs(before, inputs, ctx)
        b = capture_node_outputs(after, inputs, ctx)
    except Exception as e:  # noqa: BLE001 - diagnosis only
        return None, f"could not compare node outputs: {type(e).__name__}: {e}"
    for n in after.graph.nodes:
        if n.name not in a or n.name not in b or n.op == "output":
            continue
        x, y = a[n.name], b[n.name]
        if x.shape != y.shape or not x.is_floating_point():
            continue
        dev = compare_outputs([[x]], [[y]], rtol, atol)
        if not dev.ok:
            src = f"module '{n.target}'" if n.op == "call_module" else f"{n.op} {getattr(n.target, '__name__', n.target)}"
            return n.name, f"{src}: max abs error {dev.max_abs:.3g}"
    return None, ""
