"""Construction steps every model factory shares (causal LM, seq2seq rephraser, classifier).

Each factory in `lm`, `tiny_llama`, `seq2seq` and `encoder` is "validate the options, build or
load, then fit the model to the tokenizer": the steps live here once, so a fix to one (how a
seed is applied, when embeddings are resized, how LoRA is attached) reaches every factory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from safealign.errors import ConfigError

M = TypeVar("M")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype for `model.dtype`, or a ConfigError naming the valid ones."""
    if name not in DTYPES:
        raise ConfigError("model.dtype", f"expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_memory_options(gradient_checkpointing: object, attn_implementation: object) -> None:
    """Fail on a misspelt value before any weights are read (a 7B load takes minutes)."""
    if not isinstance(gradient_checkpointing, bool):
        raise ConfigError(
            "model.lm.gradient_checkpointing",
            f"expected true or false, got {gradient_checkpointing!r}",
        )
    if attn_implementation is None:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    valid = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    # "org/repo[:fn]" is a hub kernel (the `kernels` package); transformers checks it at load.
    if not isinstance(attn_implementation, str) or (
        attn_implementation not in valid and "/" not in attn_implementation
    ):
        raise ConfigError(
            "model.lm.attn_implementation",
            f"expected null (transformers' default) or one of {sorted(valid)}, got {attn_implementation!r}",
        )


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them.

    Non-reentrant torch.utils.checkpoint: gradients flow even when the block inputs do not require
    grad (frozen embeddings under LoRA) and it composes with DDP/FSDP. The KV cache is useless in
    training and conflicts with recomputation, so it is switched off."""
    # transformers 5.x renamed gradient_checkpointing_enable (now a deprecated alias).
    enable = (
        getattr(model, "activation_checkpointing_enable", None)
        or model.gradient_checkpointing_enable
    )
    enable({"use_reentrant": False})
    model.config.use_cache = False


def seeded(build: Callable[..., M], seed: int, *args, **kwargs) -> M:
    """`build(*args, **kwargs)` under a forked CPU RNG seeded with `seed`.

    Random init (or a fresh classification head) then depends on `seed` alone, and building a
    model never moves the caller's global stream (randomness is an argument, STYLE.md 13)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(*args, **kwargs)


def causal_token_ids(tokenizer) -> dict[str, int | None]:
    """BOS/EOS/pad ids of a causal LM config built for `tokenizer` (BOS = EOS, as GPT-2)."""
    return {
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_from_config(
    model_cls: Callable[[object], nn.Module], config, seed: int, gradient_checkpointing: bool
) -> nn.Module:
    """A randomly initialised `model_cls(config)` (seeded), optionally activation-checkpointed."""
    model = seeded(model_cls, seed, config)
    if gradient_checkpointing:
        checkpoint_activations(model)
    return model


def fit_to_tokenizer(model: nn.Module, tokenizer) -> nn.Module:
    """Grow the embeddings when the tokenizer has more tokens than the checkpoint (`[TOXIC]`
    registered after training) and fill a missing pad id from the tokenizer."""
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def add_lora(model: nn.Module, lora: dict | None, task_type: str) -> nn.Module:
    """Wrap `model` in a peft LoRA adapter when `lora` (LoraConfig kwargs) is set."""
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(task_type=task_type, **dict(lora)))
