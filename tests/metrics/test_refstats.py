"""Reading EDM / ADM / MAR style reference npz files (small files made here)."""

import numpy as np
import pytest

from repro.errors import MissingResource
from repro.metrics.refstats import RefStats, load_reference_stats


def test_edm_and_mar_style_mu_sigma(tmp_path):
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=8), np.cov(rng.normal(size=(50, 8)), rowvar=False)
    for name in ("cifar10-32x32.npz", "adm_in256_stats.npz"):
        np.savez(tmp_path / name, mu=mu.astype(np.float32), sigma=sigma)
        stats = load_reference_stats(tmp_path / name)
        assert isinstance(stats, RefStats)
        np.testing.assert_allclose(stats.mu, mu.astype(np.float32).astype(np.float64))
        np.testing.assert_array_equal(stats.sigma, sigma)
        assert stats.mu.dtype == np.float64 and stats.images is None
        assert name in stats.source


def test_adm_batch_with_stats_and_images_keeps_stored_stats(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "VIRTUAL_tiny.npz", arr_0=images, mu=np.ones(4), sigma=np.eye(4), mu_s=np.zeros(2), sigma_s=np.eye(2))
    stats = load_reference_stats(tmp_path / "VIRTUAL_tiny.npz", keep_images=True)
    np.testing.assert_array_equal(stats.mu, np.ones(4))
    np.testing.assert_array_equal(stats.images, images)
    assert load_reference_stats(tmp_path / "VIRTUAL_tiny.npz").images is None
    from repro.metrics.image_metrics import reference_features

    options = {"cache_dir": tmp_path / "cache", "train_limit": 1000, "epochs": 1, "width": 8, "test_limit": 500}
    feats = reference_features(stats, "mnist-classifier", batch_size=2, **options)
    assert feats["pool"].shape == (3, 128) and feats["logits"].shape == (3, 10)
    with pytest.raises(ValueError, match="keep_images"):
        reference_features(load_reference_stats(tmp_path / "VIRTUAL_tiny.npz"), "mnist-classifier", **options)


def test_images_only_npz_computes_stats_with_named_extractor(tmp_path):
    import torch

    from repro.data.mnist import load_mnist
    from repro.metrics.image_metrics import extract

    images, _ = load_mnist("test")
    batch = images[:40].unsqueeze(-1).repeat(1, 1, 1, 3).numpy()  # NHWC RGB like ADM batches
    np.savez(tmp_path / "images_only.npz", arr_0=batch)
    with pytest.raises(ValueError, match="extractor"):
        load_reference_stats(tmp_path / "images_only.npz")
    options = {"cache_dir": tmp_path / "cache", "train_limit": 1000, "epochs": 1, "width": 8, "test_limit": 500}
    stats = load_reference_stats(tmp_path / "images_only.npz", extractor="mnist-classifier", batch_size=16, **options)
    feats = extract(torch.from_numpy(batch).permute(0, 3, 1, 2), "mnist-classifier", **options)["pool"].astype(np.float64)
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-6)
    assert "images_only.npz" in stats.source
    assert stats.n == 40 and stats.extractor == "mnist-classifier"


def test_missing_file_names_where_to_download(tmp_path):
    with pytest.raises(MissingResource, match="nvlabs-fi-cdn.nvidia.com/edm/fid-refs"):
        load_reference_stats(tmp_path / "imagenet-64x64.npz")
    with pytest.raises(MissingResource, match="guided-diffusion"):
        load_reference_stats(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    with pytest.raises(MissingResource, match="LTH14/mar"):
        load_reference_stats(tmp_path / "adm_in256_stats.npz")


def test_bad_npz_and_save_roundtrip(tmp_path):
    np.savez(tmp_path / "bad.npz", something=np.zeros(3))
    with pytest.raises(ValueError, match="mu/sigma or arr_0"):
        load_reference_stats(tmp_path / "bad.npz")
    with pytest.raises(ValueError):
        RefStats(mu=np.zeros(3), sigma=np.eye(4))
    stats = RefStats(mu=np.arange(3.0), sigma=np.eye(3) * 2, n=7, source="x", extractor="mnist-classifier")
    stats.save(tmp_path / "rt.npz")
    back = load_reference_stats(tmp_path / "rt.npz")
    np.testing.assert_array_equal(back.mu, stats.mu)
    assert back.n == 7 and back.extractor == "mnist-classifier"
