"""Causal LM factories. Built from a config (tiny, random init) or loaded from a local path.

Safetensors only, never remote code (DEVELOPERS.md standards). Both factories take the tokenizer
so the embedding matrix always matches its vocabulary, `[TOXIC]` included.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from safealign.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError("model.dtype", f"expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def build_tiny_gpt2(
    tokenizer,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 128,
    n_positions: int = 256,
    dropout: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """A small GPT-2 with random init from an explicit generator seed (never downloaded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=n_positions,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Init under a forked RNG so building a model never moves the caller's global stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model


def load_causal_lm(
    tokenizer,
    name_or_path: str,
    dtype: str = "float32",
    lora: dict | None = None,
    local_files_only: bool = True,
) -> nn.Module:
    """Load a causal LM from a local path (or hub id when `local_files_only=False`).

    Embeddings are resized when the tokenizer gained `[TOXIC]`. With `lora`, wraps the model in
    a peft LoRA adapter (`lora` holds LoraConfig kwargs, e.g. r, lora_alpha, target_modules).
    """
    from transformers import AutoModelForCausalLM

    if local_files_only and not Path(name_or_path).exists():
        raise ConfigError(
            "model.name_or_path",
            f"{name_or_path!r} does not exist locally; set model.local_files_only=false to use a hub id",
        )
    dtype_ = _dtype(dtype)  # validate before loading anything
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        dtype=dtype_,
        trust_remote_code=False,
        use_safetensors=True,
        local_files_only=local_files_only,
    )
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **dict(lora)))
    return model


def frozen(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the reference / inner toxic model of DPO and ADPO."""
    model.eval()
    model.requires_grad_(False)
    return model
