"""Fréchet distance against an independent float64 scipy computation and against the peer tools."""

import numpy as np
import pytest
import scipy.linalg

from repro.metrics.frechet import feature_statistics, frechet_distance, frechet_distance_from_features


def reference_fd(mu1, s1, mu2, s2):
    # Independent textbook formula: Tr((S1 S2)^{1/2}) via scipy's matrix square root, all float64.
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("method", ["sqrtm", "eigvals"])
@pytest.mark.parametrize("d", [1, 5, 64])
def test_matches_scipy_on_random_spd(method, d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(reference_fd(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)


def test_closed_form_for_commuting_covariances():
    # Diagonal covariances: FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2, no matrix functions involved.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    for method in ("sqrtm", "eigvals"):
        assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(expected, rel=1e-12)


def test_identical_gaussians_give_zero_and_float32_inputs_are_promoted():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(400, 16)).astype(np.float32)
    mu, sigma = feature_statistics(feats)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    assert isinstance(frechet_distance(mu.astype(np.float32), sigma.astype(np.float32), mu, sigma), float)


def test_features_agree_with_scipy_reference():
    rng = np.random.default_rng(1)
    f1 = rng.normal(size=(300, 32))
    f2 = rng.normal(size=(300, 32)) * 1.2 + 0.3
    expected = reference_fd(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert frechet_distance_from_features(f1, f2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_from_features(f1, f2, method="eigvals") == pytest.approx(expected, rel=1e-8)


def test_shape_errors_and_unknown_method():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="magic")


def test_matches_clean_fid_and_torch_fidelity():
    cleanfid_fid = pytest.importorskip("cleanfid.fid")
    tf_fid = pytest.importorskip("torch_fidelity.metric_fid")
    rng = np.random.default_rng(2)
    f1, f2 = rng.normal(size=(500, 48)), rng.normal(size=(500, 48)) + 0.05
    mu1, s1 = feature_statistics(f1)
    mu2, s2 = feature_statistics(f2)
    ours_sqrtm = frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    ours_eig = frechet_distance(mu1, s1, mu2, s2, method="eigvals")
    assert ours_sqrtm == pytest.approx(float(cleanfid_fid.frechet_distance(mu1, s1, mu2, s2)), rel=1e-10)
    theirs = tf_fid.fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert ours_eig == pytest.approx(theirs[tf_fid.KEY_METRIC_FID], rel=1e-10)
    assert ours_sqrtm == pytest.approx(ours_eig, rel=1e-7)
