"""Selection and training data for DCP: any re-iterable of ``(inputs, targets)`` batches (a
``DataLoader``, a list of pairs), checked once with messages that name the fix."""
from __future__ import annotations

from typing import Any, Iterator

import torch

from .errors import DCPError

_FORMAT = ("a re-iterable of (inputs, targets) batches: a torch.utils.data.DataLoader over a labelled data set, "
           "or a list such as [(x, y), ...] with x an N×... input tensor and y the N class indices")


def split_batch(batch: Any, owner: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``(inputs as a tuple, targets)`` of one batch; a batch without targets is an error."""
    if isinstance(batch, torch.Tensor) or not isinstance(batch, (tuple, list)):
        raise DCPError(f"{owner}: a batch is a {type(batch).__name__}, not an (inputs, targets) pair. DCP's losses "
                       f"need the labels: give {_FORMAT}.")
    if len(batch) < 2:
        raise DCPError(f"{owner}: a batch holds {len(batch)} item(s), not (inputs, targets): DCP's losses need the "
                       f"labels. Give {_FORMAT}.")
    inputs, targets = batch[0], batch[1]
    if not isinstance(targets, torch.Tensor):
        raise DCPError(f"{owner}: the targets of a batch are a {type(targets).__name__}, not a tensor of class "
                       f"indices (or class probabilities). Give {_FORMAT}.")
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise DCPError(f"{owner}: the inputs of a batch must be a tensor or a tuple of tensors. Give {_FORMAT}.")
    return inputs, targets


def to_device(inputs: tuple[torch.Tensor, ...], targets: torch.Tensor, device: torch.device,
              dtype: torch.dtype | None = None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Batch tensors on ``device``; floating inputs in ``dtype`` (the model's) when given."""
    moved = tuple(t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
                  for t in inputs)
    return moved, targets.to(device)


class DataSource:
    """The ``data=`` of a DCP pass or helper, checked: re-iterable, non-empty, batches of
    ``(inputs, targets)``. Iterating yields ``(inputs tuple, targets)``; its ``repr`` is short
    (pass options are recorded in the graph's history)."""

    def __init__(self, data: Any, owner: str):
        if isinstance(data, DataSource):
            data = data.data
        if data is None:
            raise DCPError(f"{owner}: needs data=...: {_FORMAT} (the paper selects channels on the training set; "
                           f"a few thousand samples are usually enough).")
        if isinstance(data, torch.Tensor):
            raise DCPError(f"{owner}: data is a tensor; DCP needs labelled batches: {_FORMAT}.")
        try:
            it = iter(data)
        except TypeError:
            raise DCPError(f"{owner}: data is a {type(data).__name__}, which cannot be iterated; "
                           f"give {_FORMAT}.") from None
        if it is data:
            raise DCPError(f"{owner}: data is a one-shot iterator ({type(data).__name__}); DCP reads the data many "
                           f"times. Give a DataLoader or a list of batches (e.g. list(batches)).")
        first = next(it, None)
        if first is None:
            raise DCPError(f"{owner}: data is empty; give {_FORMAT}.")
        split_batch(first, owner)
        self.data, self.owner = data, owner
        try:
            self.batches: int | None = len(data)
        except TypeError:
            self.batches = None

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
        for batch in self.data:
            yield split_batch(batch, self.owner)

    def __len__(self) -> int:
        if self.batches is None:
            self.batches = sum(1 for _ in self.data)
        return self.batches

    def __repr__(self) -> str:
        n = f"{self.batches} batches" if self.batches is not None else "batches"
        return f"<{type(self.data).__name__}: {n} of (inputs, targets)>"


def as_source(data: Any, owner: str) -> DataSource:
    return data if isinstance(data, DataSource) else DataSource(data, owner)
