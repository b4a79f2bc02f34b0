"""Diffusion networks of the EDM checkpoints used by the Restart paper, re-implemented for this project.

This is a **re-implementation** (written from the architecture description, not copied) of the network classes that
EDM (Karras et al. 2022, github.com/NVlabs/edm, ``training/networks.py``) stores in its released pickles:

* ``SongUNet``      -- DDPM++ / NCSN++ (CIFAR-10 ``baseline-cifar10-32x32-uncond-vp.pkl``, ``edm-cifar10-32x32-uncond-vp.pkl``)
* ``DhariwalUNet``  -- ADM (``edm-imagenet-64x64-cond-adm.pkl``)
* ``VPPrecond``, ``VEPrecond``, ``iDDPMPrecond``, ``EDMPrecond`` -- the preconditioning wrappers, ``D(x; sigma)``.

Compatibility contract: constructor keyword arguments, sub-module names (hence ``state_dict()`` keys), the order of
the encoder/decoder ``ModuleDict`` entries, and the arithmetic of every forward pass follow EDM, so that the tensors
of an EDM pickle load with ``load_state_dict(strict=True)`` and give the same outputs. Weight *initialisation* is
only meant to be sensible (it does not reproduce EDM's random streams), since every real use loads trained weights.

Verification (side by side with EDM commit 008a4e5, kept outside the repo because EDM is CC BY-NC-SA; rerun it with
``REPRO_EDM_SRC=<edm checkout> pytest tests/restart/test_edm_pickle.py``): EDM networks with every parameter
randomised, pickled by EDM's own persistence and loaded by ``load_edm_pickle``, give bit-identical outputs (max
abs difference 0.0) for EDMPrecond/VPPrecond + DDPM++ CIFAR-10 (55,733,891 parameters, 425 tensors),
EDMPrecond + ADM ImageNet-64 (295,899,267 parameters, 553 tensors), VEPrecond + NCSN++, skip encoder/decoder and
iDDPMPrecond + ADM (small configs). Not yet checked against the released checkpoint files themselves, nor with
fp16 on CUDA.

Use :func:`build_network` to construct a network from the class name and ``init_kwargs`` found in an EDM pickle,
and :func:`repro.restart.edm_pickle.load_edm_pickle` to load the pickle itself without running its embedded code.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as nnf

from repro.errors import UnknownName

__all__ = [
    "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding",
    "SongUNet", "DhariwalUNet", "VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond",
    "NETWORK_CLASSES", "build_network", "count_parameters", "skip_weight_init",
    "tiny_songunet_kwargs", "tiny_dhariwal_kwargs", "tiny_precond_kwargs", "tiny_config",
    "cifar10_ddpmpp_kwargs", "imagenet64_adm_kwargs",
]


# ---------------------------------------------------------------------------------------------------------------
# Layers


_skip_random_init: contextvars.ContextVar[bool] = contextvars.ContextVar("skip_random_init", default=False)


@contextlib.contextmanager
def skip_weight_init():
    """Build networks with all-zero weights, for when every tensor is overwritten by a checkpoint right after
    (random init of the 296M-parameter ImageNet model costs tens of seconds on a CPU)."""
    token = _skip_random_init.set(True)
    try:
        yield
    finally:
        _skip_random_init.reset(token)


def _initial_values(shape: list[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Random initial values; ``mode`` names one of the four schemes EDM's constructors ask for."""
    if _skip_random_init.get():
        return torch.zeros(shape)
    uniform = torch.rand(*shape) * 2 - 1  # U(-1, 1)
    if mode == "xavier_uniform":
        return uniform * math.sqrt(6 / (fan_in + fan_out))
    if mode == "xavier_normal":
        return torch.randn(*shape) * math.sqrt(2 / (fan_in + fan_out))
    if mode == "kaiming_uniform":
        return uniform * math.sqrt(3 / fan_in)
    if mode == "kaiming_normal":
        return torch.randn(*shape) * math.sqrt(1 / fan_in)
    raise ValueError(f"unknown init_mode {mode!r}; expected xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal")


class Linear(nn.Module):
    """Fully connected layer; weights are cast to the input dtype so fp16 inputs run in fp16."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(_initial_values([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(_initial_values([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


class Conv2d(nn.Module):
    """2-D convolution with optional 2x up/down-sampling by a separable FIR filter.

    ``kernel=0`` gives a weightless layer that only resamples. ``fused_resample`` changes the order of filtering and
    convolution (and thus the padding), exactly as the NCSN++ residual encoder expects.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(_initial_values([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
                       if kernel else None)
        self.bias = nn.Parameter(_initial_values([out_channels], **fans) * init_bias) if kernel and bias else None
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        filter_2d = torch.outer(taps, taps)[None, None] / taps.sum().square()  # [1, 1, k, k], sums to 1
        # Registered even when unused (as None) so the module layout matches the checkpoints.
        self.register_buffer("resample_filter", filter_2d if (up or down) else None)

    def _blur_upsample(self, x: torch.Tensor, f: torch.Tensor, padding: int) -> torch.Tensor:
        channels = x.shape[1]
        return nn.functional.conv_transpose2d(x, (f * 4).tile([channels, 1, 1, 1]), groups=channels, stride=2,
                                              padding=padding)

    def _blur_downsample(self, x: torch.Tensor, f: torch.Tensor, padding: int) -> torch.Tensor:
        channels = x.shape[1]
        return nn.functional.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2

        if w is not None and self.fused_resample and self.up:
            x = self._blur_upsample(x, f, padding=max(f_pad - w_pad, 0))
            x = nn.functional.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif w is not None and self.fused_resample and self.down:
            x = nn.functional.conv2d(x, w, padding=w_pad + f_pad)
            x = self._blur_downsample(x, f, padding=0)
        else:
            if self.up:
                x = self._blur_upsample(x, f, padding=f_pad)
            if self.down:
                x = self._blur_downsample(x, f, padding=f_pad)
            if w is not None:
                x = nn.functional.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation whose group count shrinks for narrow layers (at least ``min_channels_per_group``)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_channels // min_channels_per_group, num_groups)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                                        bias=self.bias.to(x.dtype), eps=self.eps)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Single-head dot-product attention over pixels; the softmax runs in fp32 whatever the input dtype."""
    channels = k.shape[1]
    logits = torch.einsum("ncq,nck->nqk", q.to(torch.float32), (k / np.sqrt(channels)).to(torch.float32))
    weights = logits.softmax(dim=2).to(q.dtype)
    return torch.einsum("nqk,nck->ncq", weights, v)


class UNetBlock(nn.Module):
    """Residual block with noise-embedding modulation, optional resampling and optional self-attention.

    One class serves DDPM++, NCSN++ and ADM; the differences are in the keyword arguments (skip scaling, adaptive
    scale/shift, resample projection, init schemes).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True,
                 init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None):
        init = {} if init is None else init
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, **resample, **init)
        # adaptive_scale: the embedding gives a per-channel scale and shift; otherwise only a shift.
        self.affine = Linear(in_features=emb_channels, out_features=out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if up or down or in_channels != out_channels:
            # A 1x1 projection when channels change (or when asked to); a weightless resample otherwise.
            skip_kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=skip_kernel, **resample,
                               **init)

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels * 3, kernel=1,
                              **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shortcut = x
        h = self.conv0(nnf.silu(self.norm0(x)))
        modulation = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = modulation.chunk(chunks=2, dim=1)
            h = nnf.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = nnf.silu(self.norm1(h + modulation))
        h = self.conv1(nn.functional.dropout(h, p=self.dropout, training=self.training))
        h = h + (shortcut if self.skip is None else self.skip(shortcut))
        h = h * self.skip_scale

        if self.num_heads:
            n, c = h.shape[:2]
            # The qkv channels are laid out as [head, channel-in-head, (q, k, v)]; the checkpoints depend on it.
            q, k, v = self.qkv(self.norm2(h)).reshape(n * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            attended = _attention(q, k, v)
            h = self.proj(attended.reshape(*h.shape)) + h
            h = h * self.skip_scale
        return h


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample: ``[cos(x * f_i), sin(x * f_i)]`` with geometric frequencies."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** exponents
        angles = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (NCSN++); the frequencies are a buffer stored in the checkpoint."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def _drop_labels(labels: torch.Tensor, p: float, batch: int) -> torch.Tensor:
    """Zero whole label vectors with probability ``p`` (classifier-free guidance training)."""
    keep = torch.rand([batch, 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


# ---------------------------------------------------------------------------------------------------------------
# U-Nets


def _unet_levels(img_resolution: int, channel_mult: Sequence[int]) -> list[tuple[int, int, int]]:
    """(level, resolution, channel multiplier) per U-Net level; the resolution halves at each level."""
    return [(level, img_resolution // 2 ** level, channel_mult[level]) for level in range(len(channel_mult))]


def _run_layer(layer: nn.Module, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """Encoder entries are either embedding-conditioned blocks or plain convolutions."""
    return layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)


def _with_skip(x: torch.Tensor, skips: list[torch.Tensor], wanted_channels: int) -> torch.Tensor:
    """Concatenate the most recent skip connection when the next decoder block expects a wider input."""
    if wanted_channels == x.shape[1]:
        return x
    return torch.cat((x, skips.pop()), dim=1)


class SongUNet(nn.Module):
    """DDPM++ (``embedding_type='positional'``, ``encoder_type='standard'``) and NCSN++ (``'fourier'``,
    ``'residual'``, ``resample_filter=[1,3,3,1]``, ``channel_mult_noise=2``) U-Nets of Song et al. (2021),
    in EDM's formulation."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[int] = (1, 1)):
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type must be 'fourier' or 'positional', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        super().__init__()
        channel_mult, attn_resolutions, resample_filter = list(channel_mult), list(attn_resolutions), list(resample_filter)
        self.init_kwargs = copy.deepcopy(dict(
            img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels, label_dim=label_dim,
            augment_dim=augment_dim, model_channels=model_channels, channel_mult=channel_mult,
            channel_mult_emb=channel_mult_emb, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
            dropout=dropout, label_dropout=label_dropout, embedding_type=embedding_type,
            channel_mult_noise=channel_mult_noise, encoder_type=encoder_type, decoder_type=decoder_type,
            resample_filter=resample_filter))
        self.label_dropout = label_dropout
        emb_channels = channel_mult_emb * model_channels
        noise_channels = channel_mult_noise * model_channels
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Noise-level (and label / augmentation) mapping network.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = None if not label_dim else Linear(label_dim, noise_channels, **init)
        self.map_augment = (Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init)
                            if augment_dim else None)
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder: entries are visited in insertion order by forward(); 'aux' entries form the side path.
        self.enc = nn.ModuleDict()
        channels = in_channels
        aux_channels = in_channels
        for level, res, mult in _unet_levels(img_resolution, channel_mult):
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels=channels, out_channels=model_channels, kernel=3,
                                                      **init)
                channels = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(in_channels=channels, out_channels=channels, down=True,
                                                          **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(in_channels=aux_channels, out_channels=aux_channels,
                                                               kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(in_channels=aux_channels, out_channels=channels,
                                                               kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        in_channels=aux_channels, out_channels=channels, kernel=3, down=True,
                        resample_filter=resample_filter, fused_resample=True, **init)
                    aux_channels = channels
            for block_idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{block_idx}"] = UNetBlock(in_channels=channels,
                                                                out_channels=model_channels * mult,
                                                                attention=(res in attn_resolutions), **block_kwargs)
                channels = model_channels * mult
        skip_channels = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder: a block whose input is wider than the running tensor concatenates the next skip connection.
        self.dec = nn.ModuleDict()
        last_level = len(channel_mult) - 1
        for level, res, mult in reversed(_unet_levels(img_resolution, channel_mult)):
            if level == last_level:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(in_channels=channels, out_channels=channels, attention=True,
                                                         **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(in_channels=channels, out_channels=channels, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(in_channels=channels, out_channels=channels, up=True,
                                                        **block_kwargs)
            for block_idx in range(num_blocks + 1):
                block_in = channels + skip_channels.pop()
                channels = model_channels * mult
                self.dec[f"{res}x{res}_block{block_idx}"] = UNetBlock(
                    in_channels=block_in, out_channels=channels,
                    attention=(block_idx == num_blocks and res in attn_resolutions), **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < last_level:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(in_channels=out_channels, out_channels=out_channels,
                                                             kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=channels, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(in_channels=channels, out_channels=out_channels, kernel=3,
                                                           **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        noise_emb = self.map_noise(noise_labels)
        # [cos, sin] -> [sin, cos], the half order the checkpoints were trained with.
        emb = noise_emb.reshape(noise_emb.shape[0], 2, -1).flip(1).reshape(*noise_emb.shape)
        if isinstance(self.map_label, Linear):
            labels = class_labels
            if self.label_dropout and self.training:
                labels = _drop_labels(labels, self.label_dropout, x.shape[0])
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if augment_labels is not None and self.map_augment is not None:
            emb = self.map_augment(augment_labels) + emb
        for mapping in (self.map_layer0, self.map_layer1):
            emb = nnf.silu(mapping(emb))

        skips: list[torch.Tensor] = []
        aux = x
        for key, layer in self.enc.items():
            if "aux_down" in key:
                aux = layer(aux)
            elif "aux_skip" in key:
                x = layer(aux) + x
                skips[-1] = x
            elif "aux_residual" in key:
                # The residual side path replaces both the main tensor and its stored skip.
                aux = x = (layer(aux) + x) / math.sqrt(2)
                skips[-1] = x
            else:
                x = _run_layer(layer, x, emb)
                skips.append(x)

        aux = None
        normed = None
        for key, layer in self.dec.items():
            if "aux_up" in key:
                aux = layer(aux)
            elif "aux_norm" in key:
                normed = layer(x)
            elif "aux_conv" in key:
                out = layer(nnf.silu(normed))
                aux = out if aux is None else out + aux
            else:
                x = layer(_with_skip(x, skips, layer.in_channels), emb)
        return aux


class DhariwalUNet(nn.Module):
    """ADM U-Net of Dhariwal & Nichol (2021), in EDM's formulation (ImageNet-64 model)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0):
        super().__init__()
        channel_mult, attn_resolutions = list(channel_mult), list(attn_resolutions)
        self.init_kwargs = copy.deepcopy(dict(
            img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels, label_dim=label_dim,
            augment_dim=augment_dim, model_channels=model_channels, channel_mult=channel_mult,
            channel_mult_emb=channel_mult_emb, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
            dropout=dropout, label_dropout=label_dropout))
        self.label_dropout = label_dropout
        emb_channels = channel_mult_emb * model_channels
        init = dict(init_mode="kaiming_uniform", init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = (Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero)
                            if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(in_features=label_dim, out_features=emb_channels, bias=False,
                                 init_mode="kaiming_normal", init_weight=np.sqrt(label_dim)) if label_dim else None)

        self.enc = nn.ModuleDict()
        channels = in_channels
        for level, res, mult in _unet_levels(img_resolution, channel_mult):
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels=channels, out_channels=model_channels * mult,
                                                      kernel=3, **init)
                channels = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(in_channels=channels, out_channels=channels, down=True,
                                                          **block_kwargs)
            for block_idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{block_idx}"] = UNetBlock(in_channels=channels,
                                                                out_channels=model_channels * mult,
                                                                attention=(res in attn_resolutions), **block_kwargs)
                channels = model_channels * mult
        skip_channels = [block.out_channels for block in self.enc.values()]

        self.dec = nn.ModuleDict()
        last_level = len(channel_mult) - 1
        for level, res, mult in reversed(_unet_levels(img_resolution, channel_mult)):
            if level == last_level:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(in_channels=channels, out_channels=channels, attention=True,
                                                         **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(in_channels=channels, out_channels=channels, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(in_channels=channels, out_channels=channels, up=True,
                                                        **block_kwargs)
            for block_idx in range(num_blocks + 1):
                block_in = channels + skip_channels.pop()
                channels = model_channels * mult
                self.dec[f"{res}x{res}_block{block_idx}"] = UNetBlock(in_channels=block_in, out_channels=channels,
                                                                attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=channels)
        self.out_conv = Conv2d(in_channels=channels, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        noise_emb = self.map_noise(noise_labels)
        if augment_labels is not None and self.map_augment is not None:
            noise_emb = self.map_augment(augment_labels) + noise_emb
        hidden = self.map_layer1(nnf.silu(self.map_layer0(noise_emb)))
        if isinstance(self.map_label, Linear):
            labels = class_labels
            if self.label_dropout and self.training:
                labels = _drop_labels(labels, self.label_dropout, x.shape[0])
            hidden = hidden + self.map_label(labels)
        emb = nnf.silu(hidden)

        skips: list[torch.Tensor] = []
        for layer in self.enc.values():
            x = _run_layer(layer, x, emb)
            skips.append(x)
        for layer in self.dec.values():
            x = layer(_with_skip(x, skips, layer.in_channels), emb)
        return self.out_conv(nnf.silu(self.out_norm(x)))


_UNET_CLASSES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def _make_unet(model_type: str, **kwargs: Any) -> nn.Module:
    if model_type not in _UNET_CLASSES:
        raise UnknownName(f"unknown model_type {model_type!r}; expected one of {sorted(_UNET_CLASSES)}")
    return _UNET_CLASSES[model_type](**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Preconditioning: D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))


def _tensor(value: Any) -> torch.Tensor:
    """Tensors pass through unchanged (no copy); anything else becomes a tensor with torch's default dtype rules."""
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def _unit_variance_scale(sigma: torch.Tensor) -> torch.Tensor:
    """c_in = 1 / sqrt(sigma^2 + 1): scales x + sigma * noise (unit-variance data) back to unit variance."""
    return torch.rsqrt(sigma.square() + 1)


class _Precond(nn.Module):
    """Shared plumbing of the preconditioning wrappers (label handling, fp16 policy, output dtype check)."""

    img_channels: int
    label_dim: int
    use_fp16: bool
    model: nn.Module

    def _prepare(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None,
                 force_fp32: bool):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        # fp16 only on CUDA and only when the checkpoint was trained for it.
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32
        return x, sigma, class_labels, dtype

    def _run_model(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels, dtype, model_kwargs) -> torch.Tensor:
        out = self.model(x_in.to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        if out.dtype != dtype:
            raise RuntimeError(f"model returned {out.dtype}, expected {dtype}")
        return out.to(torch.float32)

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Noise levels are continuous for this formulation, so rounding is the identity."""
        return _tensor(sigma)


class VPPrecond(_Precond):
    """Variance-preserving formulation (Song et al. 2021); ``sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)``."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", **model_kwargs: Any):
        super().__init__()
        self.init_kwargs = copy.deepcopy(dict(img_resolution=img_resolution, img_channels=img_channels,
                                              label_dim=label_dim, use_fp16=use_fp16, beta_d=beta_d,
                                              beta_min=beta_min, M=M, epsilon_t=epsilon_t, model_type=model_type,
                                              **model_kwargs))
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # float32 evaluation as in the checkpoints' own code; on the CPU so that torch.device('meta') builds work.
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, device="cpu")))
        self.sigma_max = float(self.sigma(torch.tensor(1, device="cpu")))
        self.model = _make_unet(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, force_fp32: bool = False,
                **model_kwargs: Any) -> torch.Tensor:
        x, sigma, class_labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        c_in = _unit_variance_scale(sigma)
        c_noise = self.sigma_inv(sigma) * (self.M - 1)
        # The network predicts the noise epsilon: D = x - sigma * eps.
        return x - sigma * self._run_model(c_in * x, c_noise, class_labels, dtype, model_kwargs)

    def sigma(self, t):
        t = _tensor(t)
        exponent = self.beta_min * t + (0.5 * self.beta_d) * t.square()
        return (exponent.exp() - 1).sqrt()

    def sigma_inv(self, sigma: torch.Tensor | float) -> torch.Tensor:
        # Positive root of the quadratic beta_d t^2 / 2 + beta_min t = ln(1 + sigma^2).
        log_var = (_tensor(sigma).square() + 1).log()
        discriminant = (2 * self.beta_d) * log_var + self.beta_min ** 2
        return (discriminant.sqrt() - self.beta_min) / self.beta_d


class VEPrecond(_Precond):
    """Variance-exploding formulation (Song et al. 2021)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100, model_type: str = "SongUNet",
                 **model_kwargs: Any):
        super().__init__()
        self.init_kwargs = copy.deepcopy(dict(img_resolution=img_resolution, img_channels=img_channels,
                                              label_dim=label_dim, use_fp16=use_fp16, sigma_min=sigma_min,
                                              sigma_max=sigma_max, model_type=model_type, **model_kwargs))
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.model = _make_unet(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, force_fp32: bool = False,
                **model_kwargs: Any) -> torch.Tensor:
        x, sigma, class_labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        c_noise = torch.log(sigma / 2)
        return x + sigma * self._run_model(x, c_noise, class_labels, dtype, model_kwargs)


class iDDPMPrecond(_Precond):
    """Improved-DDPM formulation (Nichol & Dhariwal 2021): a discrete table ``u`` of M+1 noise levels."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, model_type: str = "DhariwalUNet",
                 **model_kwargs: Any):
        super().__init__()
        self.init_kwargs = copy.deepcopy(dict(img_resolution=img_resolution, img_channels=img_channels,
                                              label_dim=label_dim, use_fp16=use_fp16, C_1=C_1, C_2=C_2, M=M,
                                              model_type=model_type, **model_kwargs))
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        # The network also predicts the variance, hence twice the channels.
        self.model = _make_unet(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                out_channels=img_channels * 2, label_dim=label_dim, **model_kwargs)
        u = torch.zeros(M + 1, device="cpu")  # a constant table: keep it real even under torch.device('meta')
        for j in range(M, 0, -1):
            ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer("u", u)
        # u decreases with the index and ends at u[M] = 0, so the smallest usable level is u[M - 1].
        self.sigma_max, self.sigma_min = float(u[0]), float(u[-2])

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, force_fp32: bool = False,
                **model_kwargs: Any) -> torch.Tensor:
        x, sigma, class_labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        c_in = _unit_variance_scale(sigma)
        level_index = self.round_sigma(sigma, return_index=True)
        c_noise = (self.M - 1) - level_index.float()
        out = self._run_model(c_in * x, c_noise, class_labels, dtype, model_kwargs)
        return x - sigma * out[:, :self.img_channels]

    def alpha_bar(self, j):
        j = torch.as_tensor(j, device="cpu")
        angle = (np.pi / 2) * j / self.M / (1 + self.C_2)
        return angle.sin().square()

    def round_sigma(self, sigma, return_index: bool = False):
        """Snap each sigma to the nearest level of the discrete table ``u``."""
        sigma = _tensor(sigma)
        index = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1),
                            self.u.reshape(1, -1, 1)).argmin(2)
        if return_index:
            picked = index
        else:
            picked = self.u[index.flatten()].to(sigma.dtype)
        return picked.reshape(sigma.shape).to(device=sigma.device)


class EDMPrecond(_Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1) with ``c_noise = ln(sigma) / 4``."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", pfgmpp: bool | None = None, D: int | None = None,
                 **model_kwargs: Any):
        super().__init__()
        # PFGM++ checkpoints (Newbeeer/pfgmpp) pickle the same class with two extra arguments, ``pfgmpp`` and ``D``
        # (augmented dimensions; their default is 128). The network and its preconditioning are EDM's in sigma =
        # r / sqrt(D); only the sampler's prior and Restart jump change. They are kept as attributes (``D``, ``N``)
        # so the sampler can check the spec's pfgmpp_D against the checkpoint.
        pfgm_kwargs = {} if pfgmpp is None and D is None else dict(pfgmpp=bool(pfgmpp), D=128 if D is None else int(D))
        self.init_kwargs = copy.deepcopy(dict(img_resolution=img_resolution, img_channels=img_channels,
                                              label_dim=label_dim, use_fp16=use_fp16, sigma_min=sigma_min,
                                              sigma_max=sigma_max, sigma_data=sigma_data, model_type=model_type,
                                              **pfgm_kwargs, **model_kwargs))
        self.pfgmpp = bool(pfgm_kwargs.get("pfgmpp", False))
        if self.pfgmpp:
            self.D = pfgm_kwargs["D"]
            self.N = img_channels * img_resolution * img_resolution
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = _make_unet(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, force_fp32: bool = False,
                **model_kwargs: Any) -> torch.Tensor:
        x, sigma, class_labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip * x + c_out * self._run_model(c_in * x, c_noise, class_labels, dtype, model_kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Construction by EDM class name


NETWORK_CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (VPPrecond, VEPrecond, iDDPMPrecond, EDMPrecond, SongUNet, DhariwalUNet, UNetBlock, Linear, Conv2d,
                GroupNorm, PositionalEmbedding, FourierEmbedding)
}


def build_network(class_name: str, init_kwargs: dict[str, Any]) -> nn.Module:
    """Construct our re-implementation of an EDM network class.

    ``class_name`` may be bare (``"EDMPrecond"``) or qualified as in EDM's configs (``"training.networks.EDMPrecond"``);
    ``init_kwargs`` are the constructor keyword arguments, e.g. the ``_init_kwargs`` stored in an EDM pickle.
    """
    bare_name = class_name.rsplit(".", 1)[-1]
    if bare_name not in NETWORK_CLASSES:
        raise UnknownName(f"no re-implementation of EDM network class {class_name!r}; "
                          f"known: {sorted(NETWORK_CLASSES)}")
    kwargs = copy.deepcopy(dict(init_kwargs))
    kwargs.pop("class_name", None)  # EDM configs keep the class name beside the kwargs
    return NETWORK_CLASSES[bare_name](**kwargs)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Configurations


def cifar10_ddpmpp_kwargs() -> dict[str, Any]:
    """Constructor kwargs of EDM's CIFAR-10 DDPM++ models as produced by EDM's ``train.py --arch=ddpmpp``
    (``--augment`` on -> ``augment_dim=9``, ``--dropout=0.13``). Reconstructed from EDM's training defaults;
    a released pickle carries its own kwargs, which take precedence."""
    model = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                 decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                 channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13)
    # Usable with VPPrecond or EDMPrecond alike; both take the same U-Net kwargs.
    return dict(img_resolution=32, img_channels=3, label_dim=0, use_fp16=False, **model)


def imagenet64_adm_kwargs() -> dict[str, Any]:
    """Constructor kwargs of EDM's class-conditional ImageNet-64 ADM model (``--arch=adm --precond=edm --fp16=1
    --augment=0 --dropout=0.10``). Reconstructed from EDM's ``train.py``/README; the pickle's kwargs take precedence."""
    return dict(img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True, model_type="DhariwalUNet",
                model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.10)


def tiny_songunet_kwargs(img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None,
                         **overrides: Any) -> dict[str, Any]:
    """Kwargs for a small ``SongUNet`` (same code paths as DDPM++, including attention at ``img_resolution/2``),
    for smoke tests. ``overrides`` replace any key, e.g. ``embedding_type='fourier', encoder_type='residual'``."""
    kwargs = dict(img_resolution=img_resolution, in_channels=in_channels,
                  out_channels=in_channels if out_channels is None else out_channels,
                  model_channels=16, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1,
                  attn_resolutions=[img_resolution // 2], dropout=0.0)
    kwargs.update(overrides)
    return kwargs


def tiny_dhariwal_kwargs(img_resolution: int = 64, in_channels: int = 3, out_channels: int | None = None,
                         **overrides: Any) -> dict[str, Any]:
    """Kwargs for a small ``DhariwalUNet`` (ADM code paths incl. multi-head attention: 128 channels = 2 heads)."""
    kwargs = dict(img_resolution=img_resolution, in_channels=in_channels,
                  out_channels=in_channels if out_channels is None else out_channels,
                  model_channels=32, channel_mult=[1, 2, 4], channel_mult_emb=2, num_blocks=1,
                  attn_resolutions=[img_resolution // 4], dropout=0.0)
    kwargs.update(overrides)
    return kwargs


def tiny_precond_kwargs(precond: str = "EDMPrecond", model_type: str = "SongUNet", img_resolution: int | None = None,
                        img_channels: int = 3, label_dim: int = 0, **overrides: Any) -> dict[str, Any]:
    """Kwargs for ``build_network(precond, ...)`` wrapping a tiny U-Net of ``model_type``."""
    if model_type == "SongUNet":
        unet = tiny_songunet_kwargs(img_resolution or 32, img_channels)
    elif model_type == "DhariwalUNet":
        unet = tiny_dhariwal_kwargs(img_resolution or 64, img_channels)
    else:
        raise UnknownName(f"unknown model_type {model_type!r}; expected SongUNet or DhariwalUNet")
    res = unet.pop("img_resolution")
    unet.pop("in_channels")
    unet.pop("out_channels")
    kwargs = dict(img_resolution=res, img_channels=img_channels, label_dim=label_dim, model_type=model_type, **unet)
    kwargs.update(overrides)
    return kwargs


def tiny_config(class_name: str, **overrides: Any) -> dict[str, Any]:
    """Small constructor kwargs for ``build_network(class_name, ...)``: a U-Net, or a preconditioner around one
    (``model_type`` defaults to SongUNet, DhariwalUNet for iDDPMPrecond)."""
    bare_name = class_name.rsplit(".", 1)[-1]
    if bare_name == "SongUNet":
        return tiny_songunet_kwargs(**overrides)
    if bare_name == "DhariwalUNet":
        return tiny_dhariwal_kwargs(**overrides)
    if bare_name in ("VPPrecond", "VEPrecond", "EDMPrecond", "iDDPMPrecond"):
        default_model = "DhariwalUNet" if bare_name == "iDDPMPrecond" else "SongUNet"
        return tiny_precond_kwargs(bare_name, **{"model_type": default_model, **overrides})
    raise UnknownName(f"no tiny configuration for {class_name!r}")
