"""graphsel.shapes: recorded tensor metadata equals torch.fx's, and resized metadata equals what
running a resized tensor records."""
from __future__ import annotations

import pytest
import torch
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from graphsel.ir.shapes import resized_meta, tensor_metadata

TENSORS = {
    "contiguous": lambda: torch.randn(2, 3, 4, 5),
    "channels_last": lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
    "channels_last_3d": lambda: torch.randn(2, 3, 4, 5, 6).to(memory_format=torch.channels_last_3d),
    "transposed": lambda: torch.randn(3, 4).t(),
    "strided_slice": lambda: torch.randn(8)[::2],
    "size_one_dims": lambda: torch.randn(2, 1, 3, 3),
    "scalar": lambda: torch.tensor(3.0),
    "expanded": lambda: torch.randn(2, 3, 1, 1).expand(2, 3, 4, 5),
    "nhwc_permute": lambda: torch.randn(1, 3, 4, 5).permute(0, 2, 3, 1),
    "empty": lambda: torch.zeros(0, 3),
    "int": lambda: torch.arange(6).view(2, 3),
    "requires_grad": lambda: torch.randn(2, 3, requires_grad=True),
    "quantized": lambda: torch.quantize_per_tensor(torch.randn(2, 3), 0.1, 0, torch.quint8),
}


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")   # deprecated, still supported
@pytest.mark.parametrize("name", TENSORS)
def test_tensor_metadata_equals_torch_fx(name):
    t = TENSORS[name]()
    assert tensor_metadata(t) == _extract_tensor_metadata(t)


@pytest.mark.parametrize("make", [
    lambda c: torch.randn(2, c, 4, 5),
    lambda c: torch.randn(2, c, 4, 5).to(memory_format=torch.channels_last),
    lambda c: torch.randn(2, c, 4, 5).permute(0, 2, 3, 1),                 # NHWC view of NCHW data
    lambda c: torch.randn(2, c, 4, 5).permute(0, 2, 3, 1).contiguous(),
    lambda c: torch.randn(2, 4, 5, c).permute(0, 3, 1, 2),                 # NCHW view of NHWC data
    lambda c: torch.randn(4, c),
    lambda c: torch.randn(c, 4).t(),
    lambda c: torch.randn(2, c, 1, 1),
    lambda c: torch.randn(2, 1, c),
], ids=["nchw", "channels_last", "nhwc_view", "nhwc", "nchw_view", "linear", "transposed", "pooled", "token"])
@pytest.mark.parametrize("narrow", [1, 3, 5])
def test_resized_meta_is_the_metadata_of_the_narrower_tensor(make, narrow):
    """What the same ops record on data with fewer channels (the property Materialize relies on).
    Strides of size-1 dimensions are arbitrary in PyTorch (and never read), so they are not compared."""
    want = tensor_metadata(make(narrow))
    got = resized_meta(tensor_metadata(make(8)), tuple(want.shape))
    same_size_one = [g if n != 1 else None for g, n in zip(got.stride, want.shape)]
    assert got._replace(stride=same_size_one) == want._replace(
        stride=[w if n != 1 else None for w, n in zip(want.stride, want.shape)])


def test_resized_meta_refuses_layouts_it_cannot_derive():
    strided = torch.randn(2, 8, 10)[:, :, ::2]
    assert resized_meta(tensor_metadata(strided), (2, 4, 5)) is None
    expanded = torch.randn(2, 8, 1).expand(2, 8, 5)
    assert resized_meta(tensor_metadata(expanded), (2, 4, 5)) is None
