"""The project's MNIST classifier: seeded training, caching by config hash, features/logits."""

import pytest
import torch

from repro.data.mnist import from_model_range, load_mnist, to_model_range
from repro.metrics.mnist_classifier import ClassifierConfig, classifier_path, load_or_train_classifier, prepare_input

TINY = dict(train_limit=3000, epochs=1, width=8, batch_size=32, lr=3e-3, test_limit=2000)


def test_tiny_training_is_accurate_cached_and_seeded(tmp_path):
    config = ClassifierConfig(**TINY)
    model, info = load_or_train_classifier(config, cache_dir=tmp_path, progress=False)
    # 3000 images, one epoch, 8 channels: far from the 98.6% of the default config but well above chance.
    assert info["test_accuracy"] > 0.75, info
    assert classifier_path(config, tmp_path).is_file()
    again, info2 = load_or_train_classifier(config, cache_dir=tmp_path, progress=False)
    assert info2["train_seconds"] == info["train_seconds"]  # loaded, not retrained
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    other = ClassifierConfig(**{**TINY, "seed": 1})
    assert other.key() != config.key()


def test_prepare_input_handles_padding_rgb_and_resize():
    images, _ = load_mnist("test")
    x28 = prepare_input(images[:3])
    padded = from_model_range(to_model_range(images[:3], pad_to=32))
    assert torch.equal(prepare_input(padded), x28)  # 32x32 padded digits are centre-cropped back
    rgb = images[:3].unsqueeze(1).repeat(1, 3, 1, 1)
    assert torch.allclose(prepare_input(rgb), x28)
    assert prepare_input(torch.zeros(2, 1, 64, 64, dtype=torch.uint8)).shape == (2, 1, 28, 28)
    with pytest.raises(TypeError):
        prepare_input(images[:2].float())
