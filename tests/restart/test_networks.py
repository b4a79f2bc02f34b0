"""Re-implemented EDM networks: construction, key layout, preconditioning formulas, tiny forwards.

Equality with EDM's own classes (outputs, state_dict keys) is checked side by side outside the repo (EDM's code is
CC BY-NC-SA and must not enter it); the numbers pinned here were measured in that check.
"""

import math

import pytest
import torch
from torch import nn

from repro.errors import UnknownName
from repro.restart import networks as N


def _randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    """Replace every parameter by noise, so zero-initialised output layers cannot hide a broken path."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.ndim >= 2 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return net


class _ConstantModel(nn.Module):
    """Stands in for the U-Net so the preconditioning arithmetic can be checked in isolation."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.seen = {}

    def forward(self, x, noise_labels, class_labels=None, **kw):
        self.seen = dict(x=x, noise_labels=noise_labels, class_labels=class_labels, **kw)
        return torch.full_like(x, self.value)


# ---------------------------------------------------------------------------------------------------------------
# Full configurations. Built on the CPU with zero weights (skip_weight_init): random init of 296M weights is slow,
# and the meta device costs ~15 s of one-time warm-up in this torch version.


@pytest.fixture
def zero_init():
    with N.skip_weight_init():
        yield


def test_full_cifar10_ddpmpp_matches_edm_parameter_count_and_keys(zero_init):
    net = N.build_network("training.networks.EDMPrecond", N.cifar10_ddpmpp_kwargs())
    # 55,733,891 and 425 keys: measured on EDM's own EDMPrecond(SongUNet) with the same kwargs (side-by-side check).
    assert N.count_parameters(net) == 55_733_891
    keys = list(net.state_dict())
    assert len(keys) == 425
    assert keys[:3] == ["model.map_augment.weight", "model.map_layer0.weight", "model.map_layer0.bias"]
    for key in ["model.enc.32x32_conv.weight", "model.enc.16x16_down.skip.weight", "model.enc.16x16_block0.qkv.weight",
                "model.dec.8x8_in0.proj.bias", "model.dec.32x32_aux_norm.weight", "model.dec.32x32_aux_conv.weight"]:
        assert key in keys, key
    # DDPM++ has attention only at 16x16, and only after the last decoder block of that resolution.
    assert "model.dec.16x16_block4.qkv.weight" in keys and "model.dec.16x16_block3.qkv.weight" not in keys


def test_full_imagenet64_adm_matches_edm_parameter_count(zero_init):
    net = N.build_network("EDMPrecond", N.imagenet64_adm_kwargs())
    assert N.count_parameters(net) == 295_899_267  # EDM's DhariwalUNet, same kwargs: 295,899,267
    keys = set(net.state_dict())
    assert "model.map_label.weight" in keys and "model.map_label.bias" not in keys
    assert "model.out_conv.weight" in keys and "model.enc.64x64_conv.weight" in keys
    assert net.model.enc["8x8_block0"].num_heads == 768 // 64


# ---------------------------------------------------------------------------------------------------------------
# Tiny forwards through every architecture variant


@pytest.mark.parametrize("variant", [
    dict(),  # DDPM++
    dict(embedding_type="fourier", encoder_type="residual", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
    dict(encoder_type="skip", decoder_type="skip", resample_filter=[1, 3, 3, 1]),
    dict(label_dim=5, augment_dim=9),
])
def test_songunet_variants_run_and_keep_shape(variant):
    torch.manual_seed(0)
    net = _randomise(N.SongUNet(**N.tiny_songunet_kwargs(img_resolution=16, **variant))).eval()
    x = torch.randn(2, 3, 16, 16)
    labels = torch.eye(5)[:2] if variant.get("label_dim") else None
    augment = torch.randn(2, 9) if variant.get("augment_dim") else None
    with torch.no_grad():
        y = net(x, torch.tensor([0.1, -1.0]), labels, augment_labels=augment)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # The noise embedding must reach the output.
    with torch.no_grad():
        y2 = net(x, torch.tensor([2.0, 1.0]), labels, augment_labels=augment)
    assert not torch.allclose(y, y2)


def test_dhariwal_unet_with_labels_runs_and_uses_labels():
    torch.manual_seed(0)
    net = _randomise(N.DhariwalUNet(**N.tiny_dhariwal_kwargs(img_resolution=16, label_dim=4))).eval()
    assert any(getattr(block, "num_heads", 0) == 2 for block in net.enc.values())  # 128 channels / 64 per head
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = net(x, torch.tensor([10.0, 500.0]), torch.eye(4)[:2])
        b = net(x, torch.tensor([10.0, 500.0]), torch.eye(4)[2:])
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert not torch.allclose(a, b)


def test_label_dropout_only_in_training():
    net = _randomise(N.SongUNet(**N.tiny_songunet_kwargs(img_resolution=8, label_dim=3, label_dropout=1.0)))
    x, noise, labels = torch.randn(2, 3, 8, 8), torch.zeros(2), torch.eye(3)[:2]
    with torch.no_grad():
        net.train()
        dropped = net(x, noise, labels)
        unlabelled = net(x, noise, torch.zeros_like(labels))
        net.eval()
        kept = net(x, noise, labels)
    assert torch.allclose(dropped, unlabelled)  # p=1 drops every label vector while training
    assert not torch.allclose(kept, unlabelled)


def test_backward_reaches_every_parameter():
    net = N.build_network("EDMPrecond", N.tiny_config("EDMPrecond", img_resolution=8))
    _randomise(net)
    out = net(torch.randn(2, 3, 8, 8), torch.tensor([0.3, 3.0]))
    out.square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert not missing


# ---------------------------------------------------------------------------------------------------------------
# Preconditioning


def test_edm_precond_formula():
    net = N.EDMPrecond(**N.tiny_config("EDMPrecond", img_resolution=8), sigma_data=0.5)
    net.model = _ConstantModel(0.25)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 10.0])
    d = net(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    expected = 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / (s ** 2 + 0.25).sqrt() * 0.25
    assert torch.allclose(d, expected, atol=1e-6)
    assert torch.allclose(net.model.seen["x"], x / (0.25 + s ** 2).sqrt())
    assert torch.allclose(net.model.seen["noise_labels"], sigma.log() / 4)
    assert torch.equal(net.round_sigma(torch.tensor([0.3])), torch.tensor([0.3]))


def test_vp_precond_formula_and_sigma_range():
    net = N.VPPrecond(**N.tiny_config("VPPrecond", img_resolution=8))
    # Restart notes: sigma_max = sigma(1) ~ 152.2 for beta_d=19.9, beta_min=0.1; sigma_min = sigma(1e-5) ~ 1e-3.
    assert net.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-5)
    assert net.sigma_max == pytest.approx(152.2, abs=0.1)
    # sigma(1e-5) is evaluated in float32, like EDM does: exp(1e-6) rounds to 1 + 2**-20, so sigma_min is 2**-10.
    assert net.sigma_min == 2.0 ** -10
    t = torch.tensor([1e-3, 0.3, 1.0], dtype=torch.float64)  # float32 loses ~4e-4 at t=1e-3
    assert torch.allclose(net.sigma_inv(net.sigma(t)), t, rtol=1e-4)
    net.model = _ConstantModel(2.0)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 20.0])
    d = net(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    assert torch.allclose(d, x - 2.0 * s)  # D = x - sigma * eps
    assert torch.allclose(net.model.seen["x"], x / (s ** 2 + 1).sqrt())
    assert torch.allclose(net.model.seen["noise_labels"], 999 * net.sigma_inv(sigma))


def test_ve_and_iddpm_precond():
    ve = N.VEPrecond(**N.tiny_config("VEPrecond", img_resolution=8))
    ve.model = _ConstantModel(1.0)
    x, sigma = torch.randn(1, 3, 8, 8), torch.tensor([4.0])
    assert torch.allclose(ve(x, sigma), x + 4.0)
    assert torch.allclose(ve.model.seen["noise_labels"], torch.log(torch.tensor([2.0])))

    iddpm = N.iDDPMPrecond(**N.tiny_config("iDDPMPrecond", img_resolution=8))
    assert iddpm.u.shape == (1001,) and iddpm.sigma_max == float(iddpm.u[0]) and iddpm.sigma_min == float(iddpm.u[999])
    snapped = iddpm.round_sigma(torch.tensor([1.0, 5.0]))
    assert all(bool((iddpm.u - v).abs().min() == 0) for v in snapped)
    y = iddpm(torch.randn(1, 3, 8, 8), torch.tensor([1.0]))
    assert y.shape == (1, 3, 8, 8)


def test_class_labels_default_to_zeros_and_fp16_stays_off_on_cpu():
    net = N.EDMPrecond(**N.tiny_config("EDMPrecond", img_resolution=8, label_dim=3), use_fp16=True)
    net.model = _ConstantModel(0.0)
    out = net(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]))
    assert out.dtype == torch.float32
    assert torch.equal(net.model.seen["class_labels"], torch.zeros(1, 3))
    assert net.model.seen["x"].dtype == torch.float32  # fp16 only on CUDA


# ---------------------------------------------------------------------------------------------------------------
# Construction by name


def test_build_network_by_qualified_name_and_init_kwargs_roundtrip():
    net = N.build_network("training.networks.VPPrecond", N.tiny_config("VPPrecond", img_resolution=8))
    again = N.build_network(type(net).__name__, net.init_kwargs)
    assert [k for k in net.state_dict()] == [k for k in again.state_dict()]
    assert again.init_kwargs == net.init_kwargs


def test_unknown_names_are_reported():
    with pytest.raises(UnknownName, match="no re-implementation"):
        N.build_network("training.networks.SomethingElse", {})
    with pytest.raises(UnknownName, match="model_type"):
        N.build_network("EDMPrecond", dict(img_resolution=8, img_channels=3, model_type="NoSuchUNet"))
    with pytest.raises(UnknownName):
        N.tiny_config("Nope")


@pytest.mark.parametrize("name", ["SongUNet", "DhariwalUNet", "EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond"])
def test_tiny_configs_are_small(name):
    net = N.build_network(name, N.tiny_config(name))
    assert 10_000 < N.count_parameters(net) < 4_000_000


def test_skip_weight_init_is_scoped():
    with N.skip_weight_init():
        zero = N.Linear(4, 4)
    random = N.Linear(4, 4)
    assert torch.count_nonzero(zero.weight) == 0 and torch.count_nonzero(random.weight) > 0
