"""Tiny randomly initialised stand-ins of the Stable Diffusion experiment's networks and data (restart.sd smoke scale).

The smoke scale runs ``restart.sd_fid_clip`` on its paper code path; only the sizes change. These builders make,
offline and deterministically (fixed seeds, CPU init), the pieces the paper scale reads from disk:

* ``random:tiny-sd`` (settings.model_path): a diffusers ``StableDiffusionPipeline`` folder of SD v1.5's layout
  (CLIP text encoder + BPE tokenizer, cross-attention U-Net on 4-channel latents, KL VAE) and SD v1.5's scheduler
  config (PNDM, scaled_linear 0.00085-0.012, steps_offset 1, set_alpha_to_one false, clip_sample false), loaded by
  ``load_sd`` like the real folder. The tokenizer is SD's CLIP BPE vocabulary, rebuilt from open_clip's shipped merges.
* ``random:tiny-clip`` (settings.clip_model, settings.aesthetic_clip_model): an open_clip ViT config + weights with
  CLIP's tokenizer and 77-token context (ViT-g-14 is width 1024 / 40 layers; this one 32 / 1). ``*_pretrained`` is
  implied (the built weights file) and ignored.
* ``random:tiny-aesthetic`` (settings.aesthetic_weights): an ``AestheticMLP`` state dict of the official layout on
  the tiny CLIP's 32-d features; its CLIP model is then the tiny CLIP whatever ``aesthetic_clip_model`` says.
* ``random:tiny-coco`` (settings.captions): a COCO-format ``captions_val2014.json`` of the fixed captions below, and
  (settings.ref_stats) the statistics of one deterministic smooth-noise image per caption through settings.extractor.

Every piece is built once per cache through ``ctx.cached_artifact``; the key holds the configs, the seeds and the
library versions whose initialisers make the weights, so a new diffusers / torch rebuilds instead of reusing. Nothing
here is trained: the smoke numbers measure nothing about Stable Diffusion, they only guard the code path.
"""

from __future__ import annotations

import gzip
import json
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repro.errors import ReproError

SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False, trained_betas=None)
# SD v1.5's architectures at toy widths: text encoder 768/12 layers -> 32/2, U-Net (320, 640, 1280, 1280) -> (32, 64),
# VAE (128, 256, 512, 512) -> (32, 32); latents 4 x 16 x 16 (SD: 4 x 64 x 64), images 32 x 32 (SD: 512 x 512).
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                 projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=32)
# A tiny open_clip config (ViT-g-14 is embed 1024 / 40 layers; this keeps its tokenizer and 77-token context).
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TINY_CLIP_NAME = "repro-tiny-clip"  # open_clip registers a config under its file stem
SEEDS = {"sd": 0, "clip": 1, "aesthetic": 0, "coco": 0}
# Written for this project in the style of COCO captions; one image each in the tiny COCO file.
TINY_CAPTIONS = [
    "A cat sitting on a red sofa next to a window.",
    "Two buses parked beside a tall brick building.",
    "A man riding a bicycle down a busy street.",
    "A plate of pasta with tomatoes and basil.",
    "A clock tower under a cloudy sky.",
    "A dog running along a sandy beach.",
    "A red kite flying high above a green field.",
    "A bowl of oranges on a wooden kitchen table.",
    "A train pulling into a station at night.",
    "Three sheep grazing on a hillside.",
    "A woman holding an umbrella in the rain.",
    "A small boat tied to a dock on a lake.",
    "A pizza with mushrooms on a baking tray.",
    "A giraffe standing next to a tree.",
    "A laptop and a cup of coffee on a desk.",
    "A skateboarder jumping over a set of stairs.",
]
TINY_COCO_RESOLUTION = 32
SPECIAL = {  # setting -> the random: values it accepts
    "model_path": ("random:tiny-sd",),
    "clip_model": ("random:tiny-clip",),
    "aesthetic_clip_model": ("random:tiny-clip",),
    "aesthetic_weights": ("random:tiny-aesthetic",),
    "captions": ("random:tiny-coco",),
    "ref_stats": ("random:tiny-coco",),
}


def _versions(*packages: str) -> dict[str, str]:
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


# ---------------------------------------------------------------------------------------------------- builders


def clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json / merges.txt of the CLIP BPE tokenizer (SD v1.5's), rebuilt offline from the BPE merges that
    open_clip ships: byte symbols, their end-of-word forms, one token per merge, then the two special tokens."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def build_tiny_sd(root: Path, seed: int = SEEDS["sd"]) -> Path:
    """Write a tiny random StableDiffusionPipeline folder to ``root / "sd"`` (returned); the global RNG is untouched."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = Path(root)
    vocab, merges = clip_tokenizer_files(root / "tokenizer-src")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=77, pad_token="<|endoftext|>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TINY_TEXT))
        unet = UNet2DConditionModel(**TINY_UNET)
        vae = AutoencoderKL(**TINY_VAE)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "sd")
    return root / "sd"


def build_tiny_clip(folder: Path, name: str = TINY_CLIP_NAME, seed: int = SEEDS["clip"]) -> tuple[Path, Path]:
    """(config .json, weights .pt) of a tiny random open_clip model; the config is registered under ``name``."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
    weights = folder / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return config, weights


def build_tiny_aesthetic(path: Path, input_size: int = TINY_CLIP["embed_dim"], seed: int = SEEDS["aesthetic"]) -> Path:
    """Random weights (N(0, 0.1^2), every tensor) in the layout of ``sac+logos+ava1-l14-linearMSE.pth``."""
    from repro.restart.sd_experiments import AestheticMLP

    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in AestheticMLP(input_size).state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return Path(path)


def tiny_coco_images(n: int = len(TINY_CAPTIONS), resolution: int = TINY_COCO_RESOLUTION, seed: int = SEEDS["coco"]) -> torch.Tensor:
    """uint8 [n, 3, res, res] smooth random colour fields (4x4 noise, bilinear upsampling): the tiny COCO 'photos'."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64)
    up = torch.nn.functional.interpolate(low, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (up * 255).round().clamp(0, 255).to(torch.uint8)


def build_tiny_coco(folder: Path) -> Path:
    """``captions_val2014.json`` (COCO's format: images + annotations, one caption per image) and ``images.npy``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = [{"id": 1000 + i, "file_name": f"COCO_val2014_{1000 + i:012d}.jpg", "height": TINY_COCO_RESOLUTION,
               "width": TINY_COCO_RESOLUTION} for i in range(len(TINY_CAPTIONS))]
    annotations = [{"id": 5000 + i, "image_id": 1000 + i, "caption": c} for i, c in enumerate(TINY_CAPTIONS)]
    coco = {"info": {"description": "repro tiny COCO stand-in (restart.sd smoke scale); not COCO"}, "images": images, "annotations": annotations}
    (folder / "captions_val2014.json").write_text(json.dumps(coco, indent=1))
    np.save(folder / "images.npy", tiny_coco_images().numpy())
    return folder / "captions_val2014.json"


# ----------------------------------------------------------------------------------------- cached, for the kind


def tiny_sd_path(ctx: Any) -> Path:
    key = {"version": 1, "seed": SEEDS["sd"], "text": TINY_TEXT, "unet": TINY_UNET, "vae": TINY_VAE, "scheduler": SD15_SCHEDULER,
           "libs": _versions("torch", "diffusers", "transformers", "open_clip_torch")}
    folder = Path(ctx.cached_artifact("restart-sd-tiny-sd", key, lambda f: build_tiny_sd(f)))
    for weights in sorted((folder / "sd").glob("*/*.safetensors")):  # cached_artifact records top-level files only
        ctx.record_file(f"tiny-sd/{weights.parent.name}/{weights.name}", weights)
    return folder / "sd"


def tiny_clip_files(ctx: Any) -> tuple[Path, Path]:
    key = {"version": 1, "seed": SEEDS["clip"], "name": TINY_CLIP_NAME, "config": TINY_CLIP, "libs": _versions("torch", "open_clip_torch")}
    folder = Path(ctx.cached_artifact("restart-sd-tiny-clip", key, lambda f: build_tiny_clip(f)))
    return folder / f"{TINY_CLIP_NAME}.json", folder / f"{TINY_CLIP_NAME}.pt"


def tiny_aesthetic_path(ctx: Any) -> Path:
    key = {"version": 1, "seed": SEEDS["aesthetic"], "input_size": TINY_CLIP["embed_dim"], "libs": _versions("torch")}
    return Path(ctx.cached_artifact("restart-sd-tiny-aesthetic", key, lambda f: build_tiny_aesthetic(f / "aesthetic.pth"))) / "aesthetic.pth"


def _coco_key() -> dict[str, Any]:
    return {"version": 1, "seed": SEEDS["coco"], "captions": TINY_CAPTIONS, "resolution": TINY_COCO_RESOLUTION, "libs": _versions("torch")}


def tiny_coco_folder(ctx: Any) -> Path:
    return Path(ctx.cached_artifact("restart-sd-tiny-coco", _coco_key(), build_tiny_coco))


def tiny_reference_stats(extractor: str, ctx: Any):
    """RefStats of the tiny COCO images through ``extractor`` (cached; the extractor's provenance is in the key)."""
    from repro.metrics.image_metrics import extract, extractor_provenance
    from repro.metrics.refstats import RefStats, load_reference_stats
    from repro.restart.image_experiments import extractor_options

    options = extractor_options(extractor, ctx)
    images_path = tiny_coco_folder(ctx) / "images.npy"
    key = {"coco": _coco_key(), "extractor": extractor, "extractor_provenance": extractor_provenance(extractor, ctx.device, **options)}

    def build(folder: Path) -> None:
        feats = extract(torch.from_numpy(np.load(images_path)), extractor, ctx.device, **options)["pool"]
        RefStats.from_features(feats, source=f"random:tiny-coco images (n={len(feats)})", extractor=extractor).save(folder / "stats.npz")

    return load_reference_stats(Path(ctx.cached_artifact("restart-sd-tiny-ref", key, build)) / "stats.npz")


def check_special(settings: dict[str, Any]) -> None:
    """A clear error for a ``random:`` value this module does not make (or in a setting that cannot take it)."""
    for name, value in settings.items():
        if isinstance(value, str) and value.startswith("random:") and value not in SPECIAL.get(name, ()):
            known = ", ".join(f"{k} = {v!r}" for k, vs in SPECIAL.items() for v in vs)
            raise ReproError(f"settings.{name} = {value!r} is not a known tiny stand-in (known: {known})")


def resolve_tiny_settings(settings: dict[str, Any], ctx: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """``settings`` with the ``random:`` stand-ins replaced by built local paths (ref_stats excepted: it depends on
    the extractor, see :func:`tiny_reference_stats`), and {setting: what was substituted} for the record."""
    check_special(settings)
    out, used = dict(settings), {}
    if out.get("model_path") == "random:tiny-sd":
        out["model_path"], used["model_path"] = str(tiny_sd_path(ctx)), "random:tiny-sd"
    if out.get("captions") == "random:tiny-coco":
        out["captions"], used["captions"] = str(tiny_coco_folder(ctx) / "captions_val2014.json"), "random:tiny-coco"
    tiny_aesthetic = out.get("aesthetic_weights") == "random:tiny-aesthetic"
    if tiny_aesthetic:
        out["aesthetic_weights"], used["aesthetic_weights"] = str(tiny_aesthetic_path(ctx)), "random:tiny-aesthetic"
        out["aesthetic_clip_model"] = "random:tiny-clip"  # the random head reads the tiny CLIP's 32-d features
    for model_key, weights_key in (("clip_model", "clip_pretrained"), ("aesthetic_clip_model", "aesthetic_clip_pretrained")):
        if out.get(model_key) == "random:tiny-clip":
            config, weights = tiny_clip_files(ctx)
            out[model_key], out[weights_key] = str(config), str(weights)
            used[model_key] = "random:tiny-clip"
    return out, used
