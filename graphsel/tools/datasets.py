"""Data sets read from local files only (graphsel never downloads).

Fashion-MNIST ships as Debian's ``dataset-fashion-mnist`` package (IDX files under
``/usr/share/datasets/fashion-mnist/``); set ``GRAPHSEL_FASHION_MNIST`` to read another folder.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# Per-pixel statistics of the Fashion-MNIST training set (computed from the IDX files).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


class DatasetNotFound(FileNotFoundError):
    pass


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = data[2], data[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=dtypes[code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {arr.size} elements")
    return arr.reshape(dims)


def write_idx(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip when the name ends in .gz); used by tests."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + arr.tobytes())


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    return None


def fashion_mnist_dir() -> Path:
    candidates = [os.environ["GRAPHSEL_FASHION_MNIST"]] if os.environ.get("GRAPHSEL_FASHION_MNIST") else []
    candidates += list(FASHION_MNIST_DIRS)
    for c in candidates:
        if _find(Path(c), _FILES["train"][0]):
            return Path(c)
    raise DatasetNotFound(
        "Fashion-MNIST not found in " + ", ".join(candidates) + ". Install it with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; IDX files under "
        "/usr/share/datasets/fashion-mnist/), or point GRAPHSEL_FASHION_MNIST at a folder holding "
        "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
        "t10k-labels-idx1-ubyte[.gz].")


def fashion_mnist(split: str = "train", *, normalize: bool = True, limit: int | None = None,
                  root: str | os.PathLike | None = None) -> torch.utils.data.TensorDataset:
    """Fashion-MNIST as a TensorDataset of (N×1×28×28 float32 images, N int64 labels)."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = Path(root) if root is not None else fashion_mnist_dir()
    img_path, lbl_path = (_find(base, s) for s in _FILES[split])
    if img_path is None or lbl_path is None:
        raise DatasetNotFound(f"Fashion-MNIST {split} files missing in {base}")
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    if normalize:
        x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return torch.utils.data.TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))
