"""What a graphsel GraphModule carries about itself: how it was traced and what passes did.

Everything lives in ``gm.meta["graphsel"]`` (a :class:`GraphselMeta`), which torch.fx copies
on ``deepcopy`` and keeps when the module is pickled.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

META_KEY = "graphsel"
_VERSIONS = itertools.count(1)


def new_version() -> int:
    """A graph version no graph had before (process-wide)."""
    return next(_VERSIONS)


@dataclass
class LeafRecord:
    """A submodule made opaque because its own code could not be traced."""
    path: str
    cls: str
    reason: str


@dataclass
class InputSpec:
    """Shape, dtype and memory format of one example input (enough to regenerate random ones)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool = False

    @classmethod
    def of(cls, t: torch.Tensor) -> "InputSpec":
        cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
        return cls(tuple(t.shape), t.dtype, cl)

    def make(self, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        if self.dtype.is_floating_point:
            t = torch.randn(self.shape, generator=generator, dtype=torch.float32).to(device=device, dtype=self.dtype)
        elif self.dtype == torch.bool:
            t = torch.randint(0, 2, self.shape, generator=generator).bool().to(device)
        else:
            t = torch.randint(0, 8, self.shape, generator=generator).to(device=device, dtype=self.dtype)
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"{'x'.join(map(str, self.shape))} {dt}{' channels_last' if self.channels_last else ''}"


@dataclass
class PassRecord:
    """One row of the pass history (rendered by :func:`graphsel.report`)."""
    name: str
    contract: str
    options: dict[str, Any]
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    nodes_added: int
    nodes_removed: int
    params_before: int | None = None
    params_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    tolerance: float | None = None
    verify_seconds: float = 0.0
    verified: bool = False             # the contract was checked (structural: the output shapes)
    stats: dict[str, Any] = field(default_factory=dict)
    diagnostics: list[Any] = field(default_factory=list)


@dataclass
class GraphselMeta:
    """Provenance of a traced program."""
    model_class: str = ""
    trace_seconds: float = 0.0
    leafed: list[LeafRecord] = field(default_factory=list)
    inputs: list[InputSpec] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    history: list[PassRecord] = field(default_factory=list)
    #: identifies the graph's content for the analysis cache of ``graphsel.pipeline.PassContext``:
    #: copies share it; a pass that changes the graph gets a new one (:func:`new_version`)
    version: int = field(default_factory=lambda: new_version())
    # Channel masks (graphsel.analysis.masks.ChannelMasks) attached by pruning passes; None when none.
    masks: Any = None
    # Free-form per-pass state that later passes read (keyed by pass name).
    state: dict[str, Any] = field(default_factory=dict)


def graphsel_meta(gm: torch.nn.Module, create: bool = True) -> GraphselMeta | None:
    """The :class:`GraphselMeta` of ``gm`` (created empty when missing and ``create``)."""
    meta = getattr(gm, "meta", None)
    if meta is None:
        return None
    m = meta.get(META_KEY)
    if m is None and create:
        m = meta[META_KEY] = GraphselMeta()
    return m
