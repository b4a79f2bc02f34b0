"""CIFAR-10 / ImageNet loaders on tiny files written here in the real formats."""

import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from repro.data.paper_data import center_crop_resize, load_cifar10, load_imagenet, save_image_folder
from repro.errors import MissingResource


def write_cifar_batches(folder, n_per_batch=3):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    everything = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        everything[name] = (data, labels)
    return everything


def test_cifar_python_folder_and_tarball(tmp_path, monkeypatch):
    batches = write_cifar_batches(tmp_path / "root" / "cifar-10-batches-py")
    monkeypatch.setenv("REPRO_DATA", str(tmp_path / "root"))
    x, y = load_cifar10("train")
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    # Row layout of the pickles: 1024 red, 1024 green, 1024 blue, row-major.
    first = batches["data_batch_1"][0][0]
    assert torch.equal(x[0, 1], torch.from_numpy(first[1024:2048].reshape(32, 32)))
    assert y[3:6].tolist() == batches["data_batch_2"][1]
    xt, yt = load_cifar10("test", limit=2)
    assert xt.shape == (2, 3, 32, 32) and yt.tolist() == batches["test_batch"][1][:2]

    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "root" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    x2, y2 = load_cifar10("train", root=tarball)
    assert torch.equal(x2, x) and torch.equal(y2, y)


def test_cifar_image_folder(tmp_path):
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    save_image_folder(images[:2], tmp_path / "cifar10" / "train" / "airplane")
    save_image_folder(images[2:], tmp_path / "cifar10" / "train" / "cat")
    x, y = load_cifar10("train", settings={"data_root": str(tmp_path)})
    assert torch.equal(x, images) and y.tolist() == [0, 0, 1, 1]


def test_cifar_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("REPRO_DATA", raising=False)
    with pytest.raises(MissingResource, match="cifar-10-python.tar.gz"):
        load_cifar10()
    with pytest.raises(MissingResource, match="REPRO_DATA"):
        load_cifar10(settings={"data_root": str(tmp_path)})


def test_imagenet_npz_formats(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    np.savez(tmp_path / "imagenet-64x64.npz", arr_0=arr, arr_1=np.arange(5))
    x, y = load_imagenet(64, settings={"data_root": str(tmp_path)})
    assert x.shape == (5, 3, 64, 64) and torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(arr))
    assert y.tolist() == [0, 1, 2, 3, 4]
    # Downsampled-ImageNet format: flat channel-first rows, 1-based labels; a folder of npz batches.
    (tmp_path / "ds").mkdir()
    flat = arr.transpose(0, 3, 1, 2).reshape(5, -1)
    np.savez(tmp_path / "ds" / "train_data_batch_1.npz", data=flat[:3], labels=np.array([1, 2, 3]))
    np.savez(tmp_path / "ds" / "train_data_batch_2.npz", data=flat[3:], labels=np.array([1000, 5]))
    x2, y2 = load_imagenet(64, root=tmp_path / "ds")
    assert torch.equal(x2, x) and y2.tolist() == [0, 1, 2, 999, 4]
    with pytest.raises(ValueError, match="expected 256x256"):
        load_imagenet(256, root=tmp_path / "imagenet-64x64.npz")


def test_imagenet_class_folders_are_center_cropped(tmp_path):
    for cls, color in (("n01440764", (255, 0, 0)), ("n01443537", (0, 0, 255))):
        (tmp_path / "train" / cls).mkdir(parents=True)
        img = Image.new("RGB", (300, 200), color)
        img.save(tmp_path / "train" / cls / "a.JPEG", quality=100)
    x, y = load_imagenet(64, root=tmp_path)
    assert x.shape == (2, 3, 64, 64) and y.tolist() == [0, 1]
    assert x[0, 0].float().mean() > 240 and x[1, 2].float().mean() > 240


def test_center_crop_resize_geometry():
    # A wide image with a distinct centre square: the crop keeps the centre.
    img = np.zeros((100, 400, 3), dtype=np.uint8)
    img[:, 150:250] = 255
    out = np.asarray(center_crop_resize(Image.fromarray(img), 20))
    assert out.shape == (20, 20, 3)
    assert out.mean() > 240


def test_imagenet_missing(tmp_path):
    with pytest.raises(MissingResource, match="image-net.org"):
        load_imagenet(256, settings={"data_root": str(tmp_path)})
