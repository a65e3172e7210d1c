"""Tokenizers: a byte-level BPE trained on the corpus (cached), or a local HF tokenizer.

Both end up as a `PreTrainedTokenizerFast` with pad/eos set and `[TOXIC]` registered once as an
additional special token, so it is never split into sub-words (a silent-tokenisation trap).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from safealign.cache import FileCache, FileFormat, content_key
from safealign.data.control import TOXIC
from safealign.errors import ConfigError
from safealign.io import stable_hash
from safealign.models.checks import (
    KEY,
    check_model_dir,
    check_probe,
    check_tokenizer_files,
    local_model_dir,
)

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def add_control_token(tokenizer) -> int:
    """Register `[TOXIC]` as a special token (idempotent). Returns its id."""
    if TOXIC not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [TOXIC]})
    return tokenizer.convert_tokens_to_ids(TOXIC)


def _finish(tok, chat_template: str | None = None):
    if chat_template is not None:  # prompts are then rendered with it (safealign/data/chat.py)
        tok.chat_template = chat_template
    if tok.eos_token is None:
        tok.eos_token = EOS
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    add_control_token(tok)
    return tok


# Pre-tokens (ByteLevel "words") longer than this are split into pieces of this many characters
# before BPE training: the trainer's work per merge grows with the length of the words the merge
# touches, so one 1 MB response of letters without spaces made training quadratic (issue 14:
# 240k characters 39 s, 1 MB ~11 min). No natural-language word is 100 characters long, so normal
# corpora train exactly as before (hence the unchanged cache version "bpe-v1"). Encoding needs no
# cap: the BPE model merges a word through a heap, O(n log n).
MAX_WORD_CHARS = 100
_MAYBE_LONG = re.compile(rf"\S{{{MAX_WORD_CHARS}}}|\s{{{MAX_WORD_CHARS + 1}}}")


def _capped(texts: list[str]) -> Iterator[str]:
    """`texts` for BPE training, each pre-token over MAX_WORD_CHARS split into separate pieces
    (texts are pre-tokenised one by one, so a piece boundary is a word boundary). Logs a count."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str
    n_words = n_texts = 0
    for text in texts:
        if not _MAYBE_LONG.search(text):  # cheap filter: a long pre-token needs a long run
            yield text
            continue
        start, long_words = 0, [(a, b) for _, (a, b) in split(text) if b - a > MAX_WORD_CHARS]
        for a, b in long_words:
            if a > start:
                yield text[start:a]
            yield from (text[i : min(i + MAX_WORD_CHARS, b)] for i in range(a, b, MAX_WORD_CHARS))
            start = b
        if start < len(text):
            yield text[start:]
        n_words, n_texts = n_words + len(long_words), n_texts + bool(long_words)
    if n_words:
        log.warning(
            "BPE training: split %d words longer than %d characters (in %d texts) into "
            "%d-character pieces (such input makes BPE training quadratic)",
            n_words,
            MAX_WORD_CHARS,
            n_texts,
            MAX_WORD_CHARS,
        )


def _save_bpe(path: Path, tok, meta: dict[str, str]) -> None:
    entry = meta | {"tokenizer": json.loads(tok.to_str())}
    path.write_text(json.dumps(entry, ensure_ascii=False, sort_keys=True), encoding="utf-8")


def _load_bpe(path: Path):
    from tokenizers import Tokenizer

    entry = json.loads(path.read_text(encoding="utf-8"))
    tok = Tokenizer.from_str(json.dumps(entry["tokenizer"]))  # raises on a malformed tokenizer
    return tok, {k: entry[k] for k in ("key", "sha256") if k in entry}


def _bpe_sha256(tok) -> str:
    """sha256 of the tokenizer's canonical JSON (vocab, merges, specials, pre-tokenizer...)."""
    return stable_hash(json.loads(tok.to_str()), length=64)


def _lacks_specials(tok) -> str | None:
    missing = [t for t in (EOS, PAD) if tok.token_to_id(t) is None]
    return f"lacks {'/'.join(missing)}" if missing else None


# One JSON file per key: {"key", "sha256", "tokenizer": <tokenizers JSON>}; a truncated, corrupt
# or foreign file is retrained (with a warning naming it), never used.
_CACHE = FileCache(
    FileFormat(_save_bpe, _load_bpe, _bpe_sha256), "cached tokenizer", "retraining it"
)


def _train_bpe(texts: list[str], vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
    tok.train_from_iterator(_capped(texts), trainer=trainer)
    return tok


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2048,
    min_frequency: int = 2,
    cache_dir: str | None = None,
    chat_template: str | None = None,
):
    """Train a byte-level BPE on `texts`; cached on disk by a hash of the texts and settings.

    Words longer than :data:`MAX_WORD_CHARS` are split before training (bounded work on hostile
    text); a cached file that does not load is retrained and rewritten, with a warning.
    `chat_template` (Jinja; None = none) is set on the tokenizer and leaves the BPE unchanged."""
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ConfigError("model.tokenizer", "cannot train a tokenizer on an empty corpus")
    key = content_key(texts, vocab_size, min_frequency, "bpe-v1")
    cached = Path(cache_dir) / f"bpe-{key}.json" if cache_dir else None
    tok = _CACHE.get_or_compute(
        cached, key, lambda: _train_bpe(texts, vocab_size, min_frequency), _lacks_specials
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    return _finish(fast, chat_template)


def load_tokenizer(
    name_or_path: str,
    texts: Iterable[str] | None = None,
    local_files_only: bool = True,
    require_model: bool = True,
    chat_template: str | None = None,
    **kwargs,
):
    """Load a local (or, where the hub is reachable, remote) tokenizer. Never runs remote code.

    Args:
        name_or_path: a local model dir, or a hub id when `local_files_only` is false.
        texts: unused (every tokenizer factory is handed the corpus by `safealign.fit.build`).
        local_files_only: read only local files (`model.lm.local_files_only`).
        require_model: also check the dir's config.json and safetensors headers. The tokenizer
            is built first, so a broken model dir fails here, before any module or data work.
        chat_template: Jinja template replacing the tokenizer's own (None = keep its own).
        kwargs: passed to `AutoTokenizer.from_pretrained`.

    Raises:
        ConfigError: naming the dir or file, for every problem in `safealign.models.checks`,
            and when the tokenizer encodes a probe text to nothing.
    """
    from transformers import AutoTokenizer

    model_dir = local_model_dir(name_or_path, local_files_only)
    if model_dir is not None and require_model:
        check_model_dir(model_dir)
    elif model_dir is not None:
        check_tokenizer_files(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(
            name_or_path, trust_remote_code=False, local_files_only=local_files_only, **kwargs
        )
    except Exception as err:  # tokenizers/transformers raise OSError, ValueError or bare Exception
        raise ConfigError(KEY, f"cannot load a tokenizer from {name_or_path}: {err}") from err
    check_probe(tok, name_or_path)
    return _finish(tok, chat_template)
