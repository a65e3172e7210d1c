"""model=tiny / model=hf factories: export round trip, [TOXIC] resize, LoRA, safetensors only."""

from __future__ import annotations

import pytest
import torch

from safealign.data.control import TOXIC
from safealign.errors import ConfigError
from safealign.models import build_tiny_gpt2, load_causal_lm, load_tokenizer, train_bpe_tokenizer

TEXTS = ["\n\nHuman: how do I water a fern?\n\nAssistant: Keep the soil moist."] * 30


@pytest.fixture
def saved(tmp_path):
    tok = train_bpe_tokenizer(TEXTS, vocab_size=280)
    model = build_tiny_gpt2(tok, n_layer=1, n_head=2, n_embd=16, n_positions=64)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tok.save_pretrained(tmp_path / "m")
    return tmp_path / "m", model


def test_round_trip_is_exact(saved):
    path, model = saved
    assert (path / "model.safetensors").exists()
    tok = load_tokenizer(str(path))
    loaded = load_causal_lm(tok, str(path))
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)
    assert tok.convert_tokens_to_ids(TOXIC) == len(tok) - 1  # registered once, not duplicated


def test_embeddings_resized_when_tokenizer_gains_the_control_token(tmp_path):
    tok = train_bpe_tokenizer(TEXTS, vocab_size=280)
    model = build_tiny_gpt2(tok, n_layer=1, n_head=2, n_embd=16, n_positions=64)
    model.resize_token_embeddings(len(tok) - 1)  # a base model that has never seen [TOXIC]
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    loaded = load_causal_lm(tok, str(tmp_path / "base"))
    assert loaded.get_input_embeddings().num_embeddings == len(tok)


def test_lora_wraps_only_adapters_trainable(saved):
    path, _ = saved
    tok = load_tokenizer(str(path))
    model = load_causal_lm(tok, str(path), lora={"r": 2, "lora_alpha": 4, "target_modules": ["c_attn"]})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_missing_path_is_a_config_error(tmp_path):
    tok = train_bpe_tokenizer(TEXTS, vocab_size=280)
    with pytest.raises(ConfigError, match="model.name_or_path"):
        load_causal_lm(tok, str(tmp_path / "nowhere"))


def test_bad_dtype_is_a_config_error(saved):
    path, _ = saved
    with pytest.raises(ConfigError, match="model.dtype"):
        load_causal_lm(load_tokenizer(str(path)), str(path), dtype="float8")
