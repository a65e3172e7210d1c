"""A small Llama-architecture causal LM built from config (random init, never downloaded).

The tiny GPT-2 (`lm.build_tiny_gpt2`) has no grouped-query attention, RMSNorm, SwiGLU or rotary
embeddings; this one has all four, so the sharded strategies (FSDP wrap policies, ZeRO-3
partitioning, export gathering) meet the same module layout as a Llama-3 / Mistral checkpoint.
"""

from __future__ import annotations

from torch import nn

from safealign.models.build import build_from_config, causal_token_ids, check_memory_options


def build_tiny_llama(
    tokenizer,
    num_hidden_layers: int = 2,
    hidden_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 256,
    max_position_embeddings: int = 256,
    rope_theta: float = 10000.0,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
) -> nn.Module:
    """A small `LlamaForCausalLM` (GQA, RMSNorm, SwiGLU, RoPE) with vocab = len(tokenizer).

    Initialised under a forked RNG seeded with `seed`, so building it never moves the caller's
    global stream. `gradient_checkpointing` and `attn_implementation` as in `load_causal_lm`.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    check_memory_options(gradient_checkpointing, attn_implementation)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=False,  # as Llama: lm_head is its own (shardable) matrix
        attn_implementation=attn_implementation,
        **causal_token_ids(tokenizer),
    )
    return build_from_config(LlamaForCausalLM, config, seed, gradient_checkpointing)
