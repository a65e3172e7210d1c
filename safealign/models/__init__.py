"""Model and tokenizer factories (Hydra `_partial_` targets)."""

from safealign.models.lm import build_tiny_gpt2, frozen, load_causal_lm
from safealign.models.tiny_llama import build_tiny_llama
from safealign.models.tokenizer import add_control_token, load_tokenizer, train_bpe_tokenizer

__all__ = [
    "add_control_token",
    "build_tiny_gpt2",
    "build_tiny_llama",
    "frozen",
    "load_causal_lm",
    "load_tokenizer",
    "train_bpe_tokenizer",
]
