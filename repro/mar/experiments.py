"""MAR (Li et al., NeurIPS 2024) experiment kind: the published protocol, declared but not yet runnable.

The MAR model, its Diffusion Loss sampler and the KL-16 tokenizer are NOT implemented in this repository
yet (no issue covers them). This kind exists so that the MAR specs describe the paper-scale protocol
(checkpoints, 50,000 images, ADM reference statistics, CFG schedule) and ``repro plan`` can cost it.
Running it checks the files the protocol needs, names what to download, and then fails with a clear
"not implemented" error: it never produces a number.
"""

from __future__ import annotations

from pathlib import Path

from repro.errors import MissingResource, ReproError
from repro.kinds import register_kind

DOWNLOADS = {
    "checkpoint": "the MAR checkpoints from LTH14/mar's util/download.py (Dropbox links; MAR-B 1.6 GB, MAR-L 3.7 GB, MAR-H 7.2 GB), "
    "placed at pretrained_models/mar/<model>/checkpoint-last.pth; the Table 1/2/3/5 ablation models are not released and must be trained",
    "vae": "the KL-16 tokenizer kl16.ckpt from LTH14/mar's util/download.py, placed at pretrained_models/vae/kl16.ckpt",
    "fid_stats": "fid_stats/adm_in256_stats.npz from the LTH14/mar repository (ADM's VIRTUAL_imagenet256_labeled statistics)",
}


def _num_iter(cell) -> int:
    s = cell.settings
    if "num_iter" in cell.params:
        return int(cell.params["num_iter"])
    by_preds = s.get("num_iter_by_preds")
    if by_preds and "preds" in cell.params:
        return int(by_preds[str(cell.params["preds"])])
    return int(s.get("num_iter", 256))


def plan_mar(cell) -> dict:
    """Cost of one cell: 50,000 images per CFG setting; each AR step runs the transformer once (twice
    with CFG) and the DDPM head num_sampling_steps times on the tokens predicted at that step."""
    s = cell.settings
    images = int(s.get("num_images", 50000))
    generations = 2 if ("with_cfg" in s and "no_cfg" in s) else 1
    steps = _num_iter(cell)
    ddpm = int(s.get("num_sampling_steps", 100))
    # Per image: one transformer pass per AR step (a doubled batch with CFG), and num_sampling_steps
    # DDPM steps of the small MLP head for each of the 256 tokens. MAR-L runs ~0.29 s/image at 64 AR
    # steps on one A100 with batch 256 (paper Table 3), which scales roughly with the number of steps.
    est = images * generations * 0.29 * steps / 64
    return {"samples": images * generations, "ar_steps": steps, "head_ddpm_steps_per_token": ddpm, "est_seconds": round(est)}


def required_files(cell) -> dict[str, str]:
    """The checkpoint, tokenizer and reference-statistics paths one cell needs, resolved from the spec's
    settings: top level, per model (``settings.models[model]``) or per tokenizer (``settings.tokenizers``)."""
    s, p = cell.settings, cell.params
    files: dict[str, str] = {}
    model = s.get("models", {}).get(p.get("model"), {}) if "model" in p else {}
    if model.get("checkpoint"):
        files["checkpoint"] = model["checkpoint"]
    elif s.get("checkpoint"):
        files["checkpoint"] = s["checkpoint"]
    elif s.get("checkpoint_template"):
        files["checkpoint"] = s["checkpoint_template"].format(**p)
    tokenizer_id = p.get("tokenizer") or s.get("tokenizer_by_loss", {}).get(p.get("loss", ""))
    tokenizer = s.get("tokenizers", {}).get(tokenizer_id, {}) if tokenizer_id else {}
    if tokenizer.get("vae"):
        files["vae"] = tokenizer["vae"]
    elif model.get("vae") or s.get("vae"):
        files["vae"] = model.get("vae") or s["vae"]
    if model.get("fid_stats") or s.get("fid_stats"):
        files["fid_stats"] = model.get("fid_stats") or s["fid_stats"]
    return files


@register_kind("mar.generate_fid", plan=plan_mar, description="MAR generation + FID/IS against ADM statistics (not implemented yet)")
def run_mar(cell, ctx) -> dict:
    missing = [f"{key}: {value} is missing; download {DOWNLOADS[key]}" for key, value in required_files(cell).items() if not Path(value).exists()]
    if missing:
        raise MissingResource("; ".join(missing))
    raise ReproError(
        "MAR sampling is not implemented in this repository yet (model, Diffusion Loss head and KL-16 VAE); "
        "the spec records the published protocol only"
    )
