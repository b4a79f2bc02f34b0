"""metrics_from_features: each backend against independent numpy formulas and against each other."""

import numpy as np
import pytest

from repro.metrics.image_metrics import metrics_from_features, metrics_provenance
from repro.metrics.refstats import RefStats

pytest.importorskip("torch_fidelity")


def independent_kid_full(x, y):
    # Unbiased MMD^2 with the cubic polynomial kernel k(a,b) = (a.b/d + 1)^3 over the whole sets.
    d = x.shape[1]
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    m = len(x)
    return (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / (m * m)


def independent_precision_recall(gen, real, k=3):
    def radii(a):
        dist = np.linalg.norm(a[:, None] - a[None], axis=-1)
        return np.sort(dist, axis=1)[:, k]  # column 0 is the point itself

    cross = np.linalg.norm(gen[:, None] - real[None], axis=-1)  # [G, R]
    precision = np.mean((cross <= radii(real)[None, :]).any(axis=1))
    recall = np.mean((cross.T <= radii(gen)[None, :]).any(axis=1))
    return precision, recall


@pytest.fixture
def feats():
    rng = np.random.default_rng(0)
    gen = rng.normal(size=(60, 16)).astype(np.float32)
    real = (rng.normal(size=(60, 16)) * 1.3 + 0.4).astype(np.float32)
    return gen, real


def test_fid_backends_agree_and_stats_equal_features(feats):
    gen, real = feats
    values = {
        b: metrics_from_features({"pool": gen}, {"pool": real}, metrics=["fid"], backend=b)["fid"]
        for b in ("repro", "torch-fidelity", "clean-fid")
    }
    assert values["repro"] == pytest.approx(values["clean-fid"], rel=1e-9)
    assert values["repro"] == pytest.approx(values["torch-fidelity"], rel=1e-6)
    stats = RefStats.from_features(real)
    assert metrics_from_features({"pool": gen}, stats, metrics=["fid"])["fid"] == pytest.approx(values["repro"], rel=1e-12)
    assert metrics_from_features({"pool": gen}, stats, metrics=["fid"], fid_method="eigvals")["fid"] == pytest.approx(
        values["repro"], rel=1e-6
    )
    assert values["repro"] > 1.0


def test_kid_matches_independent_formula_for_both_backends(feats):
    gen, real = feats
    expected = independent_kid_full(gen.astype(np.float64), real.astype(np.float64))
    for backend in ("torch-fidelity", "clean-fid"):
        # One subset of the full size is the full sets in a shuffled order: the estimator is order-free.
        out = metrics_from_features({"pool": gen}, {"pool": real}, metrics=["kid"], backend=backend, kid_subsets=1, kid_subset_size=60)
        assert out["kid"] == pytest.approx(expected, rel=1e-4), backend
    same = metrics_from_features({"pool": gen}, {"pool": gen}, metrics=["kid"], kid_subsets=1, kid_subset_size=60)
    # Identical sets do not give exactly 0: this "unbiased" estimator keeps the diagonal of K_XY (torch-fidelity).
    assert same["kid"] == pytest.approx(independent_kid_full(gen.astype(np.float64), gen.astype(np.float64)), rel=1e-4)
    assert abs(same["kid"]) < out["kid"]


def test_precision_recall_match_independent_knn(feats):
    gen, real = feats
    out = metrics_from_features({"pool": gen}, {"pool": real}, metrics=["precision", "recall"])
    precision, recall = independent_precision_recall(gen.astype(np.float64), real.astype(np.float64))
    assert out["precision"] == pytest.approx(precision, abs=1e-6)  # torch-fidelity averages in float32
    assert out["recall"] == pytest.approx(recall, abs=1e-6)
    assert 0 < out["precision"] < 1 or 0 < out["recall"] < 1  # the sets differ, so not both trivially 1
    same = metrics_from_features({"pool": gen}, {"pool": gen}, metrics=["precision", "recall"])
    assert same == {"precision": 1.0, "recall": 1.0}


def test_inception_score_limits_and_independent_value():
    rng = np.random.default_rng(0)
    uniform = np.zeros((50, 10), dtype=np.float32)
    assert metrics_from_features({"pool": uniform, "logits": uniform}, metrics=["is"])["is"] == pytest.approx(1.0)
    labels = np.repeat(np.arange(10), 10)
    confident = np.full((100, 10), -50.0, dtype=np.float32)
    confident[np.arange(100), labels] = 50.0
    assert metrics_from_features({"pool": confident, "logits": confident}, metrics=["is"], isc_splits=1)["is"] == pytest.approx(
        10.0, rel=1e-6
    )
    logits = rng.normal(size=(200, 7)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), axis=1)))
    out = metrics_from_features({"pool": logits, "logits": logits}, metrics=["is"], isc_splits=1)
    assert out["is"] == pytest.approx(expected, rel=1e-9) and out["is_std"] == 0.0


def test_available_metrics_and_errors(feats):
    gen, real = feats
    assert set(metrics_from_features({"pool": gen}, RefStats.from_features(real))) == {"fid"}
    everything = metrics_from_features({"pool": gen, "logits": gen[:, :10]}, {"pool": real}, kid_subset_size=30, kid_subsets=5)
    assert set(everything) == {"fid", "is", "is_std", "kid", "kid_std", "precision", "recall"}
    with pytest.raises(ValueError, match="logits"):
        metrics_from_features({"pool": gen}, {"pool": real}, metrics=["is"])
    with pytest.raises(ValueError, match="reference features"):
        metrics_from_features({"pool": gen}, RefStats.from_features(real), metrics=["kid"])
    with pytest.raises(ValueError, match="backend"):
        metrics_from_features({"pool": gen}, {"pool": real}, backend="tf")
    with pytest.raises(ValueError, match="does not match"):
        metrics_from_features({"pool": gen}, RefStats.from_features(real[:, :8]), metrics=["fid"])


def test_provenance_names_extractor_and_flags_mismatched_reference(feats):
    _, real = feats
    ref = RefStats.from_features(real, source="edm npz", extractor="inception-torch-fidelity")
    info = metrics_provenance("inception-fid-helper", backend="torch-fidelity", ref=ref)
    assert info["extractor"] == "inception-fid-helper" and info["fid_method"] == "eigvals"
    assert "unverified" in info["extractor_details"]["note"]
    assert "inception-torch-fidelity" in info["warning"]
    assert info["reference"]["source"] == "edm npz"
