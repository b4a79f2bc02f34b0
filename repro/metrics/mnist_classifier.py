"""A small CNN trained by this project on MNIST or Fashion-MNIST, used as the feature network for
FID / IS / KID / precision-recall at the ``small`` and ``smoke`` scales.

This is NOT the Inception network of the papers: numbers computed with it are only comparable to other
numbers computed with the same config (its hash is part of the extractor provenance).

The model is trained once (seeded, CPU, a couple of minutes for the default config), saved under
``<cache_dir>/mnist_classifier/<variant>-<config hash>.pt`` together with its test accuracy and
training time, and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from repro.data.mnist import load_mnist

CLASSIFIER_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ClassifierConfig:
    variant: str = "mnist"  # "mnist" | "fashion"
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    width: int = 32  # channels of the first conv; the second has 2x
    feature_dim: int = 128  # penultimate features used for FID/KID/PR
    train_limit: int | None = None  # use only the first N training images (tests)
    test_limit: int | None = None  # report accuracy on the first N test images only (tests)
    version: int = CLASSIFIER_FORMAT_VERSION

    def key(self) -> str:
        """Short content hash of the config: the cache key and the provenance tag."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class MnistClassifier(nn.Module):
    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 7 * 7, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 28 -> 14
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 14 -> 7
        features = F.relu(self.fc(x.flatten(1)))
        return features, self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


def prepare_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N,H,W]`` / ``[N,C,H,W]`` -> float ``[N,1,28,28]`` in [-1, 1].

    RGB is averaged to gray. 32x32 inputs are centre-cropped to 28x28 because ``to_model_range(pad_to=32)``
    pads 2 pixels of background on each side; other sizes are resized (bilinear, antialiased).
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    x = images.unsqueeze(1) if images.dim() == 3 else images
    x = x.float()
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    elif x.shape[1] != 1:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
    h, w = x.shape[-2:]
    if (h, w) == (32, 32):
        x = x[..., 2:30, 2:30]
    elif (h, w) != (28, 28):
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return x / 127.5 - 1.0


@torch.no_grad()
def evaluate_accuracy(model: MnistClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        x = prepare_input(images[start : start + batch_size]).to(device)
        correct += (model(x).argmax(1).cpu() == labels[start : start + batch_size]).sum().item()
    return correct / len(images)


def train_classifier(config: ClassifierConfig, device: torch.device | str = "cpu", progress: bool = True) -> tuple[MnistClassifier, dict]:
    """Train from scratch (seeded); returns the model and ``{"test_accuracy", "train_seconds", ...}``."""
    device = torch.device(device)
    torch.manual_seed(config.seed)
    images, labels = load_mnist("train", config.variant)
    if config.train_limit is not None:
        images, labels = images[: config.train_limit], labels[: config.train_limit]
    model = MnistClassifier(config.width, config.feature_dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = (len(images) + config.batch_size - 1) // config.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch)
    start = time.perf_counter()
    bar = tqdm(total=config.epochs * steps_per_epoch, desc=f"train {config.variant} classifier", disable=not progress)
    for _epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            x, y = prepare_input(images[idx]).to(device), labels[idx].to(device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    train_seconds = time.perf_counter() - start
    test_images, test_labels = load_mnist("test", config.variant)
    if config.test_limit is not None:
        test_images, test_labels = test_images[: config.test_limit], test_labels[: config.test_limit]
    info = {
        "test_accuracy": evaluate_accuracy(model, test_images, test_labels),
        "train_seconds": train_seconds,
        "train_images": len(images),
        "test_images": len(test_images),
        "config": asdict(config),
        "config_key": config.key(),
        "torch": torch.__version__,
    }
    return model.eval(), info


def default_cache_dir() -> Path:
    return Path(os.environ.get("REPRO_CACHE", Path.home() / ".cache" / "repro"))


def classifier_path(config: ClassifierConfig, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "mnist_classifier" / f"{config.variant}-{config.key()}.pt"


def load_or_train_classifier(
    config: ClassifierConfig = ClassifierConfig(),
    cache_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[MnistClassifier, dict]:
    """The cached model for ``config`` (training and saving it atomically on first use) and its info dict."""
    path = classifier_path(config, cache_dir)
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        model = MnistClassifier(config.width, config.feature_dim)
        model.load_state_dict(blob["state_dict"])
        info = dict(blob["info"], path=str(path))
        return model.to(device).eval(), info
    model, info = train_classifier(config, device=device, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "info": info}, tmp)
    os.replace(tmp, path)
    return model, dict(info, path=str(path))


if __name__ == "__main__":  # python -m repro.metrics.mnist_classifier [mnist|fashion]
    import sys

    variant = sys.argv[1] if len(sys.argv) > 1 else "mnist"
    _model, _info = load_or_train_classifier(ClassifierConfig(variant=variant))
    print(json.dumps(_info, indent=1))
