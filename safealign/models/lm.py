"""Causal LM factories. Built from a config (tiny, random init) or loaded from a local path.

Safetensors only, never remote code (DEVELOPERS.md standards). Both factories take the tokenizer
so the embedding matrix always matches its vocabulary, `[TOXIC]` included.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from safealign.errors import ConfigError
from safealign.models.checks import check_config, check_weights, local_model_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError("model.dtype", f"expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _check_memory_options(gradient_checkpointing: object, attn_implementation: object) -> None:
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


def _checkpoint_activations(model: nn.Module) -> None:
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

    _check_memory_options(gradient_checkpointing, attn_implementation)
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
        attn_implementation=attn_implementation,
    )
    # Init under a forked RNG so building a model never moves the caller's global stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    if gradient_checkpointing:
        _checkpoint_activations(model)
    return model


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

    model_dir = local_model_dir(name_or_path, local_files_only)
    if model_dir is not None:  # config and safetensors headers, before any weights are read
        check_config(model_dir)
        check_weights(model_dir)
    dtype_ = _dtype(dtype)  # validate before loading anything
    _check_memory_options(gradient_checkpointing, attn_implementation)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir) if model_dir is not None else name_or_path,  # the checked files
        dtype=dtype_,
        attn_implementation=attn_implementation,
        trust_remote_code=False,
        use_safetensors=True,
        local_files_only=local_files_only,
    )
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        _checkpoint_activations(model)
    if lora:
        from peft import LoraConfig, get_peft_model

        if gradient_checkpointing:
            # peft's recipe (prepare_model_for_kbit_training): the frozen embeddings' output must
            # require grad, or a checkpointed block has no differentiable input and the adapters
            # inside it get no gradient. Needed for reentrant checkpointing (DeepSpeed ZeRO-3
            # may switch to it), harmless for the non-reentrant one used here.
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **dict(lora)))
    return model


def frozen(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the reference / inner toxic model of DPO and ADPO."""
    model.eval()
    model.requires_grad_(False)
    return model
