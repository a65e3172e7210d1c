"""Tokenizers: a byte-level BPE trained on the corpus (cached), or a local HF tokenizer.

Both end up as a `PreTrainedTokenizerFast` with pad/eos set and `[TOXIC]` registered once as an
additional special token, so it is never split into sub-words (a silent-tokenisation trap).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from safealign.data.control import TOXIC
from safealign.errors import ConfigError
from safealign.io import atomic_path, stable_hash

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def add_control_token(tokenizer) -> int:
    """Register `[TOXIC]` as a special token (idempotent). Returns its id."""
    if TOXIC not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [TOXIC]})
    return tokenizer.convert_tokens_to_ids(TOXIC)


def _finish(tok):
    if tok.eos_token is None:
        tok.eos_token = EOS
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    add_control_token(tok)
    return tok


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2, cache_dir: str | None = None
):
    """Train a byte-level BPE on `texts`; cached on disk by a hash of the texts and settings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ConfigError("model.tokenizer", "cannot train a tokenizer on an empty corpus")
    key = stable_hash(texts, vocab_size, min_frequency, "bpe-v1")
    cached = Path(cache_dir) / f"bpe-{key}.json" if cache_dir else None
    if cached is not None and cached.exists():
        tok = Tokenizer.from_file(str(cached))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS, PAD],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        if cached is not None:
            with atomic_path(cached) as tmp:
                tok.save(str(tmp))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    return _finish(fast)


def load_tokenizer(name_or_path: str, texts: Iterable[str] | None = None, **kwargs):
    """Load a local (or, where the hub is reachable, remote) tokenizer. Never runs remote code."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False, **kwargs)
    return _finish(tok)
