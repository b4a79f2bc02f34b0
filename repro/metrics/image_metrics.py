"""Image-quality metrics for the experiment kinds, split in two steps so that sharded runs work:

1. :func:`extract` turns one shard of uint8 images into feature arrays (``{"pool": [N, D], "logits": [N, K]}``);
   a kind stores these per shard (``ctx.sharded``) and concatenates them.
2. :func:`metrics_from_features` turns all features (+ reference statistics or reference features) into
   FID / IS / KID / precision / recall.

Backends (record the one used; :func:`metrics_provenance` says which code computed each metric):

- ``"repro"``: FID by :func:`repro.metrics.frechet.frechet_distance` (float64, ``fid_method`` "sqrtm" by default,
  like pytorch-fid / EDM / clean-fid); IS, KID and precision/recall by torch-fidelity's metric functions.
- ``"torch-fidelity"``: every metric by torch-fidelity 0.4's functions (FID via eigenvalues, its issue #46).
- ``"clean-fid"``: FID and KID by clean-fid (``frechet_distance`` with sqrtm, ``kernel_distance``); clean-fid has
  no IS or precision/recall, so those come from torch-fidelity.

Typical use in a kind::

    ref = load_reference_stats(settings["fid_ref"])                      # or {"pool": reference features}
    feats = ctx.sharded("features", n_items=n, shard_size=500,
                        fn=lambda idx: extract(sample_images(idx), "inception-fid-helper", ctx.device))
    values = metrics_from_features(feats, ref, metrics=["fid"], backend="repro")
    ctx.record_extra("metrics_provenance", metrics_provenance("inception-fid-helper", "repro", ref))

(for the MNIST classifier pass ``cache_dir=ctx.cache_dir`` to ``extract`` so the trained net is reused).

Features always come from this project's extractors (:mod:`repro.metrics.extractors`), so the backend only
changes the metric arithmetic, never the network or the resize.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from repro.metrics.extractors import EXTRACTORS, get_extractor
from repro.metrics.frechet import frechet_distance
from repro.metrics.refstats import RefStats

BACKENDS = ("repro", "torch-fidelity", "clean-fid")
ALL_METRICS = ("fid", "is", "kid", "precision", "recall")

# Which implementation computes each metric under each backend (recorded in provenance).
IMPLEMENTATIONS = {
    "repro": {
        "fid": "repro.metrics.frechet.frechet_distance",
        "is": "torch_fidelity.metric_isc.isc_features_to_metric",
        "kid": "torch_fidelity.metric_kid.kid_features_to_metric",
        "precision": "torch_fidelity.metric_prc.prc_features_to_metric",
        "recall": "torch_fidelity.metric_prc.prc_features_to_metric",
    },
    "torch-fidelity": {
        "fid": "torch_fidelity.metric_fid.fid_statistics_to_metric (eigvals)",
        "is": "torch_fidelity.metric_isc.isc_features_to_metric",
        "kid": "torch_fidelity.metric_kid.kid_features_to_metric",
        "precision": "torch_fidelity.metric_prc.prc_features_to_metric",
        "recall": "torch_fidelity.metric_prc.prc_features_to_metric",
    },
    "clean-fid": {
        "fid": "cleanfid.fid.frechet_distance (sqrtm)",
        "is": "torch_fidelity.metric_isc.isc_features_to_metric",
        "kid": "cleanfid.fid.kernel_distance",
        "precision": "torch_fidelity.metric_prc.prc_features_to_metric",
        "recall": "torch_fidelity.metric_prc.prc_features_to_metric",
    },
}


def extract(images_uint8: torch.Tensor, extractor: str, device: torch.device | str = "cpu", **options: Any) -> dict[str, np.ndarray]:
    """Features of uint8 images ``[N, C, H, W]`` (or ``[N, H, W]``): ``{"pool": [N, D]}`` plus ``"logits"``
    when the network has a classifier head. float32 numpy arrays, rows in input order."""
    net = get_extractor(extractor, device=device, **options)
    out = net(images_uint8)
    return {key: value.detach().cpu().float().numpy() for key, value in out.items()}


def extractor_provenance(extractor: str, device: torch.device | str = "cpu", **options: Any) -> dict[str, Any]:
    return get_extractor(extractor, device=device, **options).provenance()


def pool_features_from_images(
    images: torch.Tensor, extractor: str, device: torch.device | str = "cpu", batch_size: int = 100, progress: bool = False, **options: Any
) -> np.ndarray:
    """``pool`` features of uint8 images, extracted in batches (with a progress bar when asked)."""
    from tqdm.auto import tqdm

    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc=f"ref stats ({extractor})", disable=not progress):
        chunks.append(extract(images[start : start + batch_size], extractor, device, **options)["pool"])
    return np.concatenate(chunks)


def reference_stats_from_images(
    images: torch.Tensor, extractor: str, device: torch.device | str = "cpu", batch_size: int = 100, progress: bool = False, **options: Any
) -> RefStats:
    """Mean/covariance of the ``pool`` features of uint8 images, tagged with the extractor name."""
    feats = pool_features_from_images(images, extractor, device, batch_size, progress, **options)
    return RefStats.from_features(feats, source=f"images(n={len(images)})", extractor=extractor)


def reference_features(
    ref: RefStats, extractor: str, device: torch.device | str = "cpu", batch_size: int = 100, **options: Any
) -> dict[str, np.ndarray]:
    """Features of the images stored with a reference (ADM batches keep 10,000 of them, for KID and
    precision/recall); load the file with ``load_reference_stats(path, keep_images=True)``."""
    if ref.images is None:
        raise ValueError(f"reference {ref.source!r} has no images; load it with keep_images=True (ADM batches hold arr_0)")
    images = torch.from_numpy(np.ascontiguousarray(ref.images)).permute(0, 3, 1, 2)
    parts = [extract(images[i : i + batch_size], extractor, device, **options) for i in range(0, len(images), batch_size)]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def _fid(feats: np.ndarray, ref: RefStats, backend: str, fid_method: str) -> float:
    if feats.shape[1] != ref.mu.shape[0]:
        raise ValueError(f"feature dim {feats.shape[1]} does not match reference dim {ref.mu.shape[0]} (different extractor?)")
    gen = RefStats.from_features(feats)
    if backend == "repro":
        return frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma, method=fid_method)
    if backend == "torch-fidelity":
        from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

        out = fid_statistics_to_metric({"mu": gen.mu, "sigma": gen.sigma}, {"mu": ref.mu, "sigma": ref.sigma}, verbose=False)
        return float(out[KEY_METRIC_FID])
    from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

    return float(cleanfid_frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma))


def _kid(feats: np.ndarray, ref_feats: np.ndarray, backend: str, subsets: int, subset_size: int, rng_seed: int) -> tuple[float, float]:
    if backend == "clean-fid":
        from cleanfid.fid import kernel_distance

        # clean-fid samples subsets with the global numpy RNG; seed it locally and restore the caller's state.
        state = np.random.get_state()
        np.random.seed(rng_seed)
        try:
            value = kernel_distance(
                feats.astype(np.float64), ref_feats.astype(np.float64), num_subsets=subsets, max_subset_size=subset_size
            )
        finally:
            np.random.set_state(state)
        return float(value), float("nan")
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    out = kid_features_to_metric(
        _tensor(feats), _tensor(ref_feats), kid_subsets=subsets, kid_subset_size=subset_size, rng_seed=rng_seed, verbose=False
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def metrics_from_features(
    feats: Mapping[str, np.ndarray],
    ref: RefStats | Mapping[str, np.ndarray] | None = None,
    metrics: Sequence[str] | None = None,
    backend: str = "repro",
    fid_method: str = "sqrtm",
    isc_splits: int = 10,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    rng_seed: int = 2020,
) -> dict[str, float]:
    """FID / IS / KID / precision / recall of generated features ``feats`` against ``ref``.

    ``ref`` is either :class:`RefStats` (FID only) or a dict of reference features (``{"pool": [M, D]}``; FID,
    KID and precision/recall). ``metrics=None`` computes every metric the inputs allow; naming a metric that the
    inputs cannot give (IS without logits, KID/PR without reference features) raises ValueError.

    Keys: ``fid``, ``is`` and ``is_std`` (``isc_splits`` splits, like torch-fidelity), ``kid`` and ``kid_std``
    (subset size ``min(kid_subset_size, N, M)``), ``precision`` and ``recall`` (k-NN manifolds, k=3).
    Precision follows torch-fidelity: the share of generated samples inside the reference manifold.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown metrics backend '{backend}' (choose one of {BACKENDS})")
    pool = np.asarray(feats["pool"])
    ref_feats = None
    ref_stats = None
    if isinstance(ref, RefStats):
        ref_stats = ref
    elif ref is not None:
        ref_feats = np.asarray(ref["pool"])
        ref_stats = RefStats.from_features(ref_feats)
    available = {
        "fid": ref_stats is not None,
        "is": "logits" in feats,
        "kid": ref_feats is not None,
        "precision": ref_feats is not None,
        "recall": ref_feats is not None,
    }
    if metrics is None:
        wanted = [m for m in ALL_METRICS if available[m]]
    else:
        wanted = list(metrics)
        for name in wanted:
            if name not in available:
                raise ValueError(f"unknown metric '{name}' (choose from {ALL_METRICS})")
            if not available[name]:
                need = {"fid": "reference stats or features", "is": "logits (an extractor with a classifier head)"}.get(
                    name, "reference features"
                )
                raise ValueError(f"metric '{name}' needs {need}")

    out: dict[str, float] = {}
    if "fid" in wanted:
        out["fid"] = _fid(pool, ref_stats, backend, fid_method)
    if "is" in wanted:
        from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

        isc = isc_features_to_metric(_tensor(np.asarray(feats["logits"])), splits=isc_splits, shuffle=True, rng_seed=rng_seed)
        out["is"], out["is_std"] = float(isc[KEY_METRIC_ISC_MEAN]), float(isc[KEY_METRIC_ISC_STD])
    if "kid" in wanted:
        size = min(kid_subset_size, len(pool), len(ref_feats))
        out["kid"], out["kid_std"] = _kid(pool, ref_feats, backend, kid_subsets, size, rng_seed)
    if "precision" in wanted or "recall" in wanted:
        from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

        # torch-fidelity convention: features_1 = generated, features_2 = real.
        prc = prc_features_to_metric(_tensor(pool), _tensor(ref_feats), prc_neighborhood=prc_neighborhood, verbose=False)
        if "precision" in wanted:
            out["precision"] = float(prc[KEY_METRIC_PRECISION])
        if "recall" in wanted:
            out["recall"] = float(prc[KEY_METRIC_RECALL])
    return out


def metrics_provenance(
    extractor: str,
    backend: str = "repro",
    ref: RefStats | Mapping[str, np.ndarray] | None = None,
    fid_method: str = "sqrtm",
    device: torch.device | str = "cpu",
    **options: Any,
) -> dict[str, Any]:
    """What computed the numbers: extractor (with its weights and caveats), backend and per-metric code, reference."""
    info: dict[str, Any] = {
        "extractor": extractor,
        "extractor_details": extractor_provenance(extractor, device, **options) if extractor in EXTRACTORS else None,
        "backend": backend,
        "implementations": IMPLEMENTATIONS[backend],
        "fid_method": fid_method if backend == "repro" else ("eigvals" if backend == "torch-fidelity" else "sqrtm"),
    }
    if isinstance(ref, RefStats):
        info["reference"] = ref.provenance()
        if ref.extractor is not None and ref.extractor != extractor:
            info["warning"] = f"reference stats were computed with '{ref.extractor}', features with '{extractor}'"
    elif ref is not None:
        info["reference"] = {"source": "features", "n": int(len(ref["pool"]))}
    return info
