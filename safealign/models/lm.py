"""Causal LM factories. Built from a config (tiny, random init) or loaded from a local path.

Safetensors only, never remote code (no pickle, no executed model code). Both factories take the
tokenizer so the embedding matrix always matches its vocabulary, `[TOXIC]` included.
"""

from __future__ import annotations

import logging

from torch import nn

from safealign.models.build import (
    add_lora,
    build_from_config,
    causal_token_ids,
    check_memory_options,
    checkpoint_activations,
    dtype_of,
    fit_to_tokenizer,
)
from safealign.models.checks import check_config, check_weights, local_model_dir

log = logging.getLogger(__name__)


def build_tiny_gpt2(
    tokenizer,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 128,
    n_positions: int = 256,
    dropout: float = 0.0,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """A small GPT-2 with random init from an explicit generator seed (never downloaded).

    `gradient_checkpointing` and `attn_implementation` as in :func:`load_causal_lm`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    check_memory_options(gradient_checkpointing, attn_implementation)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=n_positions,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        attn_implementation=attn_implementation,
        **causal_token_ids(tokenizer),
    )
    return build_from_config(GPT2LMHeadModel, config, seed, gradient_checkpointing)


def load_causal_lm(
    tokenizer,
    name_or_path: str,
    dtype: str = "float32",
    lora: dict | None = None,
    local_files_only: bool = True,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """Load a causal LM from a local path or hub id (from the HF cache unless
    `local_files_only=False`, which lets transformers download it).

    Embeddings are resized when the tokenizer gained `[TOXIC]`. With `lora`, wraps the model in
    a peft LoRA adapter (`lora` holds LoraConfig kwargs, e.g. r, lora_alpha, target_modules).
    `gradient_checkpointing` recomputes activations in backward (memory for compute; the loss and
    gradients are unchanged); `attn_implementation` (eager, sdpa, flash_attention_2, ...; null =
    transformers' default) is passed to `from_pretrained`. A local dir, or a hub id's cached
    snapshot, is checked first (`safealign.models.checks`): a ConfigError names what is missing
    or broken, or the cache dir an uncached hub id was looked up in.
    """
    from transformers import AutoModelForCausalLM

    source = _checked_source(name_or_path, local_files_only)
    dtype_ = dtype_of(dtype)  # validate before loading anything
    check_memory_options(gradient_checkpointing, attn_implementation)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=dtype_,
        attn_implementation=attn_implementation,
        trust_remote_code=False,
        use_safetensors=True,
        local_files_only=local_files_only,
    )
    fit_to_tokenizer(model, tokenizer)
    if gradient_checkpointing:
        checkpoint_activations(model)
        if lora:
            # peft's recipe (prepare_model_for_kbit_training): the frozen embeddings' output must
            # require grad, or a checkpointed block has no differentiable input and the adapters
            # inside it get no gradient. Needed for reentrant checkpointing (DeepSpeed ZeRO-3
            # may switch to it), harmless for the non-reentrant one used here.
            model.enable_input_require_grads()
    return add_lora(model, lora, "CAUSAL_LM")


def _checked_source(name_or_path: str, local_files_only: bool) -> str:
    """What `from_pretrained` reads: a local dir (or a hub id's cached snapshot) whose config and
    safetensors headers were checked before any weights are read, else the hub id itself."""
    model_dir = local_model_dir(name_or_path, local_files_only)
    if model_dir is None:
        return name_or_path
    check_config(model_dir)
    check_weights(model_dir)
    return str(model_dir)


def frozen(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the reference / inner toxic model of DPO and ADPO."""
    model.eval()
    model.requires_grad_(False)
    return model
