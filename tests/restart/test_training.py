"""EDM-preconditioned training of the small-scale analog: loss, resume, cached artifact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from repro.restart import training as T
from repro.spec import Cell

pytest.importorskip("repro.data.mnist")

TINY = dict(T.TRAIN_CONFIGS["mnist"], model_channels=8, steps=3, batch_size=8, checkpoint_every=1, lr_warmup_steps=2)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    net, _ = T.load_trained_network(path)
    return net.state_dict()


def test_edm_loss_is_finite_and_weighted() -> None:
    torch.manual_seed(0)
    net = T.build_network(TINY)
    images = torch.rand(4, 1, 28, 28) * 2 - 1
    loss = T.edm_loss(net, images, torch.Generator().manual_seed(0), TINY)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # A perfect denoiser (the clean image itself) has zero loss: the loss measures D(x + n) - x.
    perfect = lambda x, sigma: images  # noqa: E731
    assert T.edm_loss(perfect, images, torch.Generator().manual_seed(0), TINY).item() == 0.0


def test_training_resumes_to_identical_weights(tmp_path: Path) -> None:
    partial = T.train_model(TINY, tmp_path / "a" / "model.pt", resume_path=tmp_path / "a.resume.pt", max_steps=2)
    assert partial == tmp_path / "a.resume.pt" and not (tmp_path / "a" / "model.pt").exists()
    resumed = T.train_model(TINY, tmp_path / "a" / "model.pt", resume_path=tmp_path / "a.resume.pt")
    straight = T.train_model(TINY, tmp_path / "b" / "model.pt", resume_path=tmp_path / "b.resume.pt")
    wa, wb = _weights(resumed), _weights(straight)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    net, meta = T.load_trained_network(straight)
    assert meta["steps"] == 3 and meta["network_kwargs"]["model_type"] == "SongUNet"
    assert net(torch.zeros(2, 1, 28, 28), torch.ones(2)).shape == (2, 1, 28, 28)


def test_class_conditional_training_uses_the_labels(tmp_path: Path) -> None:
    """The fashion-cond config (the ImageNet-64 analog) trains a label-conditioned network: its output depends on the
    class label, and the labels fed to the loss are the images' own (Fashion-MNIST labels, one-hot)."""
    config = dict(T.TRAIN_CONFIGS["fashion-cond"], model_channels=8, steps=2, batch_size=8, checkpoint_every=1, lr_warmup_steps=1)
    assert "label_dim" not in T.TRAIN_CONFIGS["mnist"]  # unconditional cache keys unchanged
    images, labels = T.load_training_data(config)
    assert labels.shape == (images.shape[0],) and set(labels[:1000].tolist()) == set(range(10))
    net, meta = T.load_trained_network(T.train_model(config, tmp_path / "model.pt", resume_path=tmp_path / "r.pt"))
    assert net.label_dim == 10 and meta["network_kwargs"]["label_dim"] == 10
    x, sigma = torch.randn(2, 1, 28, 28), torch.full((2,), 1.0)
    eye = torch.eye(10)
    with torch.no_grad():
        out_a, out_b = net(x, sigma, eye[[0, 0]]), net(x, sigma, eye[[0, 7]])
    assert torch.equal(out_a[0], out_b[0]) and not torch.allclose(out_a[1], out_b[1])


def test_trained_checkpoint_is_built_once_through_the_cache(tmp_path: Path, monkeypatch) -> None:
    from repro.runner import RunContext

    monkeypatch.setitem(T.TRAIN_CONFIGS, "tiny-test", TINY)
    cell = Cell("t", "small", "restart.image_fid", {}, 0, {})
    ctx = RunContext(cell, tmp_path / "results", tmp_path / "cache", "cpu", show_progress=False)
    path = T.trained_checkpoint("tiny-test", ctx)
    assert path.name == "model.pt" and path.is_file()
    assert T.resume_state_path(tmp_path / "cache", "tiny-test", TINY).is_file()
    calls = []
    monkeypatch.setattr(T, "train_model", lambda *a, **k: calls.append(1))
    assert T.trained_checkpoint("tiny-test", ctx) == path and calls == []  # cached: no retraining
    assert "checkpoint" not in ctx.files and any(k.startswith("restart-trained-tiny-test/") for k in ctx.files)
