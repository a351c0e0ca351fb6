"""The local data loader: IDX files (plain and gzip), Fashion-MNIST from a folder, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from graphsel.tools import datasets
from graphsel.tools.datasets import DatasetNotFound, fashion_mnist, read_idx, write_idx


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    arr = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    path = tmp_path / f"a-idx3-ubyte{suffix}"
    write_idx(path, arr)
    assert np.array_equal(read_idx(path), arr)


def test_read_idx_rejects_non_idx_and_truncated_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 0x08, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="holds 3 elements"):
        read_idx(short)


def _fake_fashion_mnist(root, n_train=12, n_test=6):
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, size=(n,), dtype=np.uint8))


def test_fashion_mnist_from_a_folder(tmp_path, monkeypatch):
    _fake_fashion_mnist(tmp_path)
    monkeypatch.setenv("GRAPHSEL_FASHION_MNIST", str(tmp_path))
    train = fashion_mnist("train")
    x, y = train.tensors
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw = read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    expected = (torch.from_numpy(raw.astype(np.float32) / 255) - datasets.FASHION_MNIST_MEAN) / datasets.FASHION_MNIST_STD
    torch.testing.assert_close(x[:, 0], expected)
    test = fashion_mnist("test", normalize=False, limit=4)
    assert test.tensors[0].shape == (4, 1, 28, 28) and float(test.tensors[0].max()) <= 1.0


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHSEL_FASHION_MNIST", str(tmp_path))
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        fashion_mnist("validation", root=tmp_path)
