"""``graphsel.report``: the pass history of a graphsel GraphModule as a table."""
from __future__ import annotations

from collections import Counter

import torch.fx as fx
from tabulate import tabulate

from graphsel.ir.meta import graphsel_meta


def human(n: float | int | None, unit: str = "") -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}{unit}"
    return f"{n:.4g}{unit}" if isinstance(n, float) else f"{n}{unit}"


def _arrow(a, b) -> str:
    if a is None and b is None:
        return "-"
    if a == b:
        return human(a)
    return f"{human(a)} → {human(b)}"


def _dev(rec) -> str:
    if rec.max_abs is None:
        return "output shapes checked" if getattr(rec, "verified", False) else "not verified"
    tol = f" (≤ {rec.tolerance:.1e})" if rec.tolerance is not None else ""
    return f"{rec.max_abs:.1e}{tol}"


def report(gm: fx.GraphModule, *, diagnostics: int = 12, fmt: str = "github") -> str:
    """Render trace notes, one row per pass (time, nodes added/removed, params and MACs before →
    after, max deviation) and the passes' diagnostics (at most ``diagnostics`` per pass)."""
    meta = graphsel_meta(gm, create=False)
    if meta is None:
        raise TypeError("graphsel.report expects a GraphModule returned by graphsel.trace or graphsel.transform")
    lines = [f"graphsel report: {meta.model_class or type(gm).__name__}"]
    if meta.inputs:
        lines.append(f"inputs: {', '.join(map(str, meta.inputs))}; traced in {meta.trace_seconds:.2f} s; "
                     f"{len(gm.graph.nodes)} nodes")
    for note in meta.notes:
        lines.append(f"note: {note}")
    rows = []
    for r in meta.history:
        rows.append([r.name, r.contract, f"{r.seconds:.3f}", f"+{r.nodes_added}/-{r.nodes_removed}",
                     _arrow(r.params_before, r.params_after), _arrow(r.macs_before, r.macs_after), _dev(r),
                     ", ".join(f"{k}={human(v) if isinstance(v, (int, float)) else v}" for k, v in r.stats.items())])
    if rows:
        lines.append("")
        lines.append(tabulate(rows, headers=["pass", "contract", "time s", "nodes", "params", "MACs",
                                             "max deviation", "stats"], tablefmt=fmt))
    else:
        lines.append("no passes run")
    for r in meta.history:
        if not r.diagnostics:
            continue
        lines.append("")
        counts = Counter(d.level for d in r.diagnostics)
        lines.append(f"{r.name}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        for d in r.diagnostics[:diagnostics]:
            lines.append(f"  {d}")
        if len(r.diagnostics) > diagnostics:
            lines.append(f"  ... {len(r.diagnostics) - diagnostics} more (graphsel_meta(gm).history[i].diagnostics)")
    return "\n".join(lines)
