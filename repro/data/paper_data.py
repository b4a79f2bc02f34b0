"""CIFAR-10 and ImageNet (64x64, 256x256) from paths the user provides. Nothing is downloaded.

Where the data is looked for, in order: an explicit ``root=`` argument, ``settings["data_root"]`` (or
``settings["cifar10_path"]`` / ``settings["imagenet_path"]``), then ``$REPRO_DATA``. Under a data root these
names are tried:

- CIFAR-10: ``cifar-10-batches-py/`` (the official python pickles), ``cifar-10-python.tar.gz`` (read without
  extracting), or ``cifar10/`` as an image folder (class sub-folders, or flat files with no labels).
- ImageNet at resolution R: ``imagenet-RxR.npz`` / ``imagenetR.npz`` (``arr_0`` uint8 [N,R,R,3] and optional
  ``arr_1`` labels, the ADM batch format; or ``data`` [N, 3*R*R] + 1-based ``labels``, the downsampled-ImageNet
  format), a folder of such ``.npz`` files, or a folder of class sub-folders (ILSVRC2012 layout) whose images are
  centre-cropped and resized to R x R the way ADM prepares ImageNet (box-downsample by 2 while possible, bicubic
  resize of the short side to R, centre crop).

All loaders return ``(uint8 images [N, 3, H, W], int64 labels [N])`` (labels -1 when unknown).
"""

from __future__ import annotations

import os
import pickle
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repro.errors import MissingResource

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
IMAGENET_HINT = (
    "ImageNet is not redistributable: get ILSVRC2012 from https://image-net.org/download (a folder of class "
    "sub-folders), or a prepared npz (arr_0 uint8 [N,R,R,3], optional arr_1 labels; e.g. the 64x64 "
    "'Downsampled ImageNet' npz files from https://image-net.org/download-images)"
)


def data_root(settings: Mapping[str, Any] | None = None) -> Path | None:
    if settings and settings.get("data_root"):
        return Path(settings["data_root"])
    if os.environ.get("REPRO_DATA"):
        return Path(os.environ["REPRO_DATA"])
    return None


def _first_existing(candidates: list[Path]) -> Path | None:
    return next((p for p in candidates if p.exists()), None)


# --- CIFAR-10 ----------------------------------------------------------------------------------------------


def _cifar_batches(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def _decode_cifar_batch(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = pickle.loads(blob, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch[b"labels"], dtype=np.int64)


def _read_cifar_folder(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [_decode_cifar_batch((folder / name).read_bytes()) for name in _cifar_batches(split)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_cifar_tarball(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    wanted = _cifar_batches(split)
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name in wanted:
                found[name] = _decode_cifar_batch(tar.extractfile(member).read())
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ValueError(f"{path}: missing CIFAR-10 batches {missing}")
    return np.concatenate([found[n][0] for n in wanted]), np.concatenate([found[n][1] for n in wanted])


def read_image_folder(folder: Path, size: int | None = None, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images under ``folder`` in sorted order; labels are the sorted index of the class sub-folder (-1 if flat).

    ``size`` centre-crops and resizes every image to ``size x size`` (ADM style); without it all images must
    share one size.
    """
    from PIL import Image

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes:
        files = [
            (f, label) for label, c in enumerate(classes) for f in sorted((folder / c).rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS
        ]
    else:
        files = [(f, -1) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if limit is not None:
        files = files[:limit]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    images = []
    for path, _label in files:
        with Image.open(path) as img:
            img = img.convert("RGB")
            images.append(np.asarray(center_crop_resize(img, size) if size else img, dtype=np.uint8))
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images under {folder} have different sizes {sorted(shapes)[:3]}...; pass size=")
    return np.stack(images).transpose(0, 3, 1, 2).copy(), np.array([label for _, label in files], dtype=np.int64)


def load_cifar10(
    split: str = "train", root: str | Path | None = None, settings: Mapping[str, Any] | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 ``(uint8 [N,3,32,32], int64 labels)``: 50,000 train / 10,000 test in the official order."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown CIFAR-10 split '{split}' (train | test)")
    explicit = root or (settings or {}).get("cifar10_path")
    base = Path(explicit) if explicit else data_root(settings)
    candidates = [base] if explicit else []
    if base is not None:
        candidates += [base / "cifar-10-batches-py", base / "cifar-10-python.tar.gz", base / "cifar10"]
    # Prefer the pickles or the tarball; fall back to an image folder.
    path = _first_existing([c for c in candidates if c.is_file() or (c / "test_batch").is_file()])
    if path is None:
        image_folders = [base / "cifar10"] + ([base] if explicit else []) if base is not None else []
        path = _first_existing([c for c in image_folders if c.is_dir()])
    if path is None:
        looked = [str(c) for c in candidates] or "nowhere: set $REPRO_DATA or settings.data_root"
        raise MissingResource(
            f"CIFAR-10 not found (looked at {looked}). Download {CIFAR10_URL} and put the tarball or its extracted "
            "cifar-10-batches-py/ under $REPRO_DATA (or pass its path)"
        )
    if path.is_file():
        images, labels = _read_cifar_tarball(path, split)
    elif (path / _cifar_batches(split)[0]).is_file():
        images, labels = _read_cifar_folder(path, split)
    else:
        folder = path / split if (path / split).is_dir() else path
        images, labels = read_image_folder(folder, limit=limit)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


# --- ImageNet ----------------------------------------------------------------------------------------------


def center_crop_resize(img: Any, size: int) -> Any:
    """ADM-style preparation of a PIL image: halve with BOX filtering while the short side is >= 2*size, resize
    the short side to ``size`` with BICUBIC, then crop the centre ``size x size``. (Written from the published
    description of ADM's preprocessing; not a copy of its code.)"""
    from PIL import Image

    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), resample=Image.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def _read_imagenet_npz(path: Path, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        if "arr_0" in npz.files:
            images = npz["arr_0"]
            labels = npz["arr_1"].astype(np.int64) if "arr_1" in npz.files else np.full(len(images), -1, dtype=np.int64)
            if images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"{path}: arr_0 should be [N,H,W,3], got {images.shape}")
            images = images.transpose(0, 3, 1, 2)
        elif "data" in npz.files:
            # Downsampled-ImageNet format: rows of R*R red, then green, then blue bytes; labels 1..1000.
            images = npz["data"].reshape(-1, 3, resolution, resolution)
            labels = npz["labels"].astype(np.int64) - 1 if "labels" in npz.files else np.full(len(images), -1, dtype=np.int64)
        else:
            raise ValueError(f"{path}: expected keys arr_0[/arr_1] or data/labels, found {npz.files}")
    if images.shape[-1] != resolution or images.shape[-2] != resolution:
        raise ValueError(f"{path}: images are {images.shape[-2]}x{images.shape[-1]}, expected {resolution}x{resolution}")
    return np.ascontiguousarray(images.astype(np.uint8, copy=False)), labels


def load_imagenet(
    resolution: int = 64,
    split: str = "train",
    root: str | Path | None = None,
    settings: Mapping[str, Any] | None = None,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet at ``resolution`` (64 or 256) as ``(uint8 [N,3,R,R], int64 labels 0..999 or -1)``."""
    if resolution not in (64, 256):
        raise ValueError(f"resolution must be 64 or 256, got {resolution}")
    explicit = root or (settings or {}).get("imagenet_path")
    if explicit:
        candidates = [Path(explicit)]
    else:
        base = data_root(settings)
        r = resolution
        names = [f"imagenet-{r}x{r}.npz", f"imagenet{r}.npz", f"imagenet-{r}x{r}", f"imagenet{r}", "imagenet"]
        candidates = [base / n for n in names] if base else []
    path = _first_existing(candidates)
    if path is None:
        raise MissingResource(
            f"ImageNet {resolution}x{resolution} not found (looked at {[str(c) for c in candidates] or 'no path: set REPRO_DATA or settings.data_root'}). {IMAGENET_HINT}"
        )
    if path.is_dir() and (path / split).is_dir():
        path = path / split
    if path.is_file():
        images, labels = _read_imagenet_npz(path, resolution)
    elif any(p.suffix == ".npz" for p in path.iterdir()):
        parts = [_read_imagenet_npz(p, resolution) for p in sorted(path.glob("*.npz"))]
        images, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    else:
        images, labels = read_image_folder(path, size=resolution, limit=limit)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return torch.from_numpy(images), torch.from_numpy(labels)


def save_image_folder(images: torch.Tensor, folder: str | Path, prefix: str = "") -> list[Path]:
    """Write uint8 ``[N,C,H,W]`` images as PNGs ``{prefix}{i:06d}.png`` (for tools that read folders)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    array = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    for i, img in enumerate(array):
        hwc = img.transpose(1, 2, 0)
        pil = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
        path = folder / f"{prefix}{i:06d}.png"
        pil.save(path, format="PNG")
        paths.append(path)
    return paths
