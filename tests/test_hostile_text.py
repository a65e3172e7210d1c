"""Bounded work on hostile text and a verified BPE cache (issue 14 items 4 and 1).

One 1 MB response without spaces made BPE training quadratic (~11 min); long words are now split
before training with a counted warning, while normal corpora train exactly as before."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from safealign.models import train_bpe_tokenizer
from safealign.models.tokenizer import MAX_WORD_CHARS, _capped

ROOT = Path(__file__).resolve().parents[1]
NORMAL = [
    f"\n\nHuman: how do I water fern number {i}?\n\nAssistant: Keep the soil moist, not wet! "
    f"Über-careful plants (ferns, mosses) like shade; see https://example.org/ferns/{i}."
    for i in range(40)
]


def _reference_bpe(texts: list[str], vocab_size: int, min_frequency: int):
    """The trainer as it was before the cap: the same trainer, fed every text uncapped."""
    from unittest import mock

    from safealign.models import tokenizer

    with mock.patch.object(tokenizer, "_capped", lambda texts: texts):
        return tokenizer._train_bpe(texts, vocab_size, min_frequency)


def test_normal_corpus_trains_exactly_as_before_the_cap(caplog):
    with caplog.at_level(logging.WARNING, logger="safealign"):
        tok = train_bpe_tokenizer(NORMAL, vocab_size=400)
    assert not [r for r in caplog.records if "longer than" in r.getMessage()]
    ref = _reference_bpe(NORMAL, 400, 2)
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    assert model == json.loads(ref.to_str())["model"]  # vocab and merges, in order
    for text in NORMAL[:5]:
        assert tok(text)["input_ids"] == ref.encode(text).ids


def test_cap_splits_only_long_words_and_keeps_every_character():
    long_word = "x" * (2 * MAX_WORD_CHARS + 50)
    text = f"short words, then {long_word} and more"
    pieces = list(_capped(["plain text", text]))
    assert pieces[0] == "plain text" and "".join(pieces[1:]) == text
    # " xxx…" is one ByteLevel word (leading space included): split into MAX_WORD_CHARS pieces.
    assert [len(p) for p in pieces[2:5]] == [MAX_WORD_CHARS, MAX_WORD_CHARS, 51]
    assert pieces[1] == "short words, then" and pieces[5] == " and more"


# Runs in a subprocess so a regression to quadratic work fails by timeout instead of hanging.
HOSTILE = textwrap.dedent(
    """
    import logging, random, string
    logging.basicConfig(level=logging.WARNING)
    from safealign.models import train_bpe_tokenizer
    rng = random.Random(0)
    blob = "".join(rng.choice(string.ascii_lowercase) for _ in range(1_000_000))  # one 1 MB word
    normal = ["Human: how do I water a fern? Assistant: Keep the soil moist."] * 50
    tok = train_bpe_tokenizer(normal + [blob], vocab_size=2048)
    ids = tok(blob, add_special_tokens=False)["input_ids"]  # encoding is linear too
    assert tok.decode(ids) == blob, "round trip"
    from safealign.data.collate import encode
    enc = encode(tok, "Human: hi\\n\\nAssistant:", blob, 64, 96)  # a data row with the blob
    assert len(enc.input_ids) == 96 and enc.truncated
    print("ok", len(ids))
    """
)


def test_one_megabyte_word_trains_in_bounded_time():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-c", HOSTILE], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")
    assert f"split 1 words longer than {MAX_WORD_CHARS} characters (in 1 texts)" in r.stderr


def _cache_file(cache: Path) -> Path:
    (path,) = cache.glob("bpe-*.json")
    return path


def test_corrupt_cached_tokenizer_is_named_and_retrained(tmp_path, caplog):
    first = train_bpe_tokenizer(NORMAL, vocab_size=300, cache_dir=str(tmp_path))
    cached = _cache_file(tmp_path)
    good = cached.read_bytes()
    for corrupt in (good[: len(good) // 2], b"{}", b""):  # truncated, not a tokenizer, empty
        cached.write_bytes(corrupt)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="safealign"):
            again = train_bpe_tokenizer(NORMAL, vocab_size=300, cache_dir=str(tmp_path))
        assert any(str(cached) in r.getMessage() and "retraining" in r.getMessage()
                   for r in caplog.records), caplog.text  # fmt: skip
        assert cached.read_bytes() == good  # rewritten whole (atomically), same content
        assert again.get_vocab() == first.get_vocab()
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]  # no temp files left behind


def test_good_cached_tokenizer_is_reused_silently(tmp_path, caplog):
    train_bpe_tokenizer(NORMAL, vocab_size=300, cache_dir=str(tmp_path))
    cached = _cache_file(tmp_path)
    mtime = cached.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="safealign"):
        train_bpe_tokenizer(NORMAL, vocab_size=300, cache_dir=str(tmp_path))
    assert cached.stat().st_mtime_ns == mtime and not caplog.records
