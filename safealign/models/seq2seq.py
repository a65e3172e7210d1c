"""Encoder-decoder factories for ISAAC's rephraser (docs/methods.md B.3: T5-small in the authors' code).

* :func:`build_tiny_t5` - a small T5 built from a config, random init (tests, the built-in demo).
* :func:`load_seq2seq` - any LOCAL seq2seq LM (T5, BART, ...): safetensors only, no remote code.

Both take the tokenizer first so the vocabulary, pad, EOS and decoder-start ids always match it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from safealign.errors import ConfigError
from safealign.models.build import add_lora, dtype_of, fit_to_tokenizer, seeded


def _special_ids(tokenizer) -> tuple[int, int]:
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or eos is None:
        raise ConfigError("model.tokenizer", "a seq2seq rephraser needs a pad and an EOS token")
    return pad, eos


def build_tiny_t5(
    tokenizer,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    d_kv: int = 16,
    d_ff: int = 64,
    dropout: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """A small T5 with random init from an explicit seed (never downloaded).

    The decoder starts from the pad token, as T5 does.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    pad, eos = _special_ids(tokenizer)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        dropout_rate=dropout,
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=pad,
    )
    return seeded(T5ForConditionalGeneration, seed, config)


def load_seq2seq(
    tokenizer,
    name_or_path: str,
    dtype: str = "float32",
    lora: dict | None = None,
    local_files_only: bool = True,
) -> nn.Module:
    """Load a seq2seq LM from a local path (or a hub id when ``local_files_only=False``).

    Same keys as :func:`safealign.models.lm.load_causal_lm`, so ``model=hf`` works with
    ``model.lm._target_=safealign.models.seq2seq.load_seq2seq``. Embeddings are resized when the
    tokenizer has more tokens than the checkpoint (e.g. after ``[TOXIC]`` was registered);
    ``lora`` holds peft LoraConfig kwargs (e.g. r, lora_alpha, target_modules: [q, v]).
    """
    from transformers import AutoModelForSeq2SeqLM

    if local_files_only and not Path(name_or_path).exists():
        raise ConfigError(
            "model.name_or_path",
            f"{name_or_path!r} does not exist locally; "
            "set model.lm.local_files_only=false to use a hub id",
        )
    _special_ids(tokenizer)
    model = AutoModelForSeq2SeqLM.from_pretrained(
        name_or_path,
        dtype=dtype_of(dtype),
        trust_remote_code=False,
        use_safetensors=True,
        local_files_only=local_files_only,
    )
    fit_to_tokenizer(model, tokenizer)
    if model.config.decoder_start_token_id is None:
        model.config.decoder_start_token_id = tokenizer.pad_token_id
    return add_lora(model, lora, "SEQ_2_SEQ_LM")
