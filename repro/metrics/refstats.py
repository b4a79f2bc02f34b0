"""Reference statistics (mean and covariance of Inception pool features) for FID.

File formats read by :func:`load_reference_stats`:

- EDM (NVlabs/edm ``fid.py ref``): ``.npz`` with ``mu`` [2048] and ``sigma`` [2048, 2048], computed with
  NVIDIA's ``inception-2015-12-05`` detector. Files:
  https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz and .../imagenet-64x64.npz
- ADM / guided-diffusion reference batches (e.g. ``VIRTUAL_imagenet256_labeled.npz``): ``arr_0`` holds
  10,000 uint8 images [N, H, W, 3] (used for precision/recall) and ``mu``/``sigma`` (plus ``mu_s``/``sigma_s``
  for sFID) over the whole dataset, computed by the TF evaluator. Download links are on
  https://github.com/openai/guided-diffusion/tree/main/evaluations
- MAR (LTH14/mar ``fid_stats/adm_in256_stats.npz``): ``mu``/``sigma`` taken from the ADM ImageNet-256 batch.
- An images-only ``.npz`` (``arr_0`` without ``mu``/``sigma``): statistics are computed from the images with a
  feature extractor that the caller names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from repro.errors import MissingResource
from repro.metrics.frechet import feature_statistics

# Where each well-known reference file comes from (used in MissingResource messages).
DOWNLOAD_HINTS = {
    "edm": "EDM reference stats: https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz and "
    "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz",
    "adm": "ADM reference batches (e.g. VIRTUAL_imagenet256_labeled.npz): links on "
    "https://github.com/openai/guided-diffusion/tree/main/evaluations "
    "(https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz)",
    "mar": "MAR's ImageNet-256 stats: fid_stats/adm_in256_stats.npz in https://github.com/LTH14/mar",
}


@dataclass
class RefStats:
    """Mean/covariance of reference features, with where they came from.

    ``source`` is free text recorded in provenance (file path, extractor name, format). ``images`` holds the
    reference images when the file had them (ADM batches), for precision/recall or for recomputing the stats
    with a different extractor.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None
    source: str = ""
    extractor: str | None = None
    images: np.ndarray | None = field(default=None, repr=False)
    # Where the reference features themselves are stored, when they are (dataset references: KID needs them).
    features_path: Path | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64).reshape(-1)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        d = self.mu.shape[0]
        if self.sigma.shape != (d, d):
            raise ValueError(f"sigma must be {d}x{d} to match mu, got {self.sigma.shape}")

    @classmethod
    def from_features(cls, features: np.ndarray, source: str = "", extractor: str | None = None) -> RefStats:
        mu, sigma = feature_statistics(features)
        return cls(mu=mu, sigma=sigma, n=int(len(features)), source=source, extractor=extractor)

    def provenance(self) -> dict[str, Any]:
        return {"source": self.source, "n": self.n, "dim": int(self.mu.shape[0]), "extractor": self.extractor}

    def save(self, path: str | Path) -> None:
        np.savez(path, mu=self.mu, sigma=self.sigma, n=-1 if self.n is None else self.n, source=self.source, extractor=self.extractor or "")


def _hint_for(path: Path) -> str:
    name = path.name.lower()
    if name.startswith(("cifar10-32x32", "imagenet-64x64")):
        return DOWNLOAD_HINTS["edm"]
    if name.startswith("virtual_") or "ref_batch" in name:
        return DOWNLOAD_HINTS["adm"]
    if "adm_in256_stats" in name:
        return DOWNLOAD_HINTS["mar"]
    return "; ".join(DOWNLOAD_HINTS.values())


def load_reference_stats(
    path: str | Path,
    extractor: str | None = None,
    device: Any = "cpu",
    batch_size: int = 50,
    keep_images: bool = False,
    **extractor_options: Any,
) -> RefStats:
    """Read reference statistics from an EDM / ADM / MAR ``.npz`` (see the module docstring).

    When the file holds only images (``arr_0``), ``extractor`` names the feature extractor used to compute the
    statistics. When it holds both stats and images, the stored stats are used and the images are kept on
    ``RefStats.images`` if ``keep_images``. ``extractor_options`` go to the extractor (e.g. ``cache_dir``).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingResource(f"reference statistics file not found: {path}. Download: {_hint_for(path)}")
    with np.load(path, allow_pickle=False) as npz:
        keys = set(npz.files)
        images = npz["arr_0"] if "arr_0" in keys and (keep_images or not {"mu", "sigma"} <= keys) else None
        if {"mu", "sigma"} <= keys:
            n = int(npz["n"]) if "n" in keys and int(npz["n"]) >= 0 else None
            stored_extractor = str(npz["extractor"]) if "extractor" in keys and str(npz["extractor"]) else None
            return RefStats(mu=npz["mu"], sigma=npz["sigma"], n=n, source=f"npz:{path}", extractor=stored_extractor, images=images)
    if images is None:
        raise ValueError(f"{path}: expected keys mu/sigma or arr_0 (images), found {sorted(keys)}")
    if extractor is None:
        raise ValueError(f"{path} holds images only; pass extractor=... to compute reference statistics from them")
    from repro.metrics.image_metrics import reference_stats_from_images

    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 should be uint8 [N, H, W, C] images, got shape {images.shape}")
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    stats = reference_stats_from_images(tensor, extractor=extractor, device=device, batch_size=batch_size, **extractor_options)
    stats.source = f"npz-images:{path}"
    stats.images = images if keep_images else None
    return stats
