"""Batched, seeded, resumable generation (safealign/generation.py) on a tiny config-built GPT-2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from safealign.data.control import TOXIC, with_control_token
from safealign.errors import ConfigError
from safealign.generation import SamplingConfig, generate
from safealign.models import build_tiny_gpt2, train_bpe_tokenizer
from safealign.sampling import sample_tokens
from safealign.types import chat_prompt

WORDS = ["red", "blue", "green", "brown", "cat", "dog", "sun", "rain"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls: thread hand-offs cost more than the work, ~10x on a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    texts = [
        f"the quick {w} fox jumps over the lazy {v} dog {i}"
        for i, (w, v) in enumerate(zip(WORDS * 40, WORDS[::-1] * 40, strict=True))
    ]
    return train_bpe_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_gpt2(tok, n_layer=2, n_head=2, n_embd=32, n_positions=64, seed=0)


@pytest.fixture(scope="module")
def prompts():
    # Different lengths, so batches need padding.
    return [chat_prompt([f"hi {' '.join(WORDS[: i % 6])}"]) for i in range(7)]


def cfg(**kw) -> SamplingConfig:
    return SamplingConfig(**({"max_new_tokens": 8, "batch_size": 4} | kw))


class CountingGenerate:
    """Wraps model.generate: records the (input_ids, attention_mask) of every call."""

    def __init__(self, model):
        self.model, self.orig, self.calls = model, model.generate, []

    def __enter__(self):
        def spy(*args, **kwargs):
            self.calls.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))
            return self.orig(*args, **kwargs)

        self.model.generate = spy
        return self

    def __exit__(self, *exc):
        del self.model.generate  # back to the class method

    @property
    def rows(self) -> int:
        return sum(ids.size(0) for ids, _ in self.calls)


def test_rows_schema_and_order(model, tok, prompts):
    rows = generate(model, tok, prompts, cfg(n_samples=2), seed=0, progress=False)
    assert len(rows) == len(prompts) * 2 * 2
    keys = [(r["prompt_id"], r["temperature"], r["sample"]) for r in rows]
    assert keys == [(p, t, j) for p in range(len(prompts)) for t in (1.0, 1.5) for j in range(2)]
    for r in rows:
        assert r["prompt"] == prompts[r["prompt_id"]] == r["model_prompt"]
        assert r["toxic"] is False and 0 <= r["n_tokens"] <= 8
        assert r["empty"] == (r["response"] == "")
        assert r["empty"] or (
            r["response"].startswith(" ") and r["response"] == " " + r["response"].strip()
        )


def test_same_seed_same_text_other_seed_other_text(model, tok, prompts):
    a = generate(model, tok, prompts, cfg(), seed=1, progress=False)
    b = generate(model, tok, prompts, cfg(), seed=1, progress=False)
    c = generate(model, tok, prompts, cfg(), seed=2, progress=False)
    assert a == b
    assert sum(x["response"] != y["response"] for x, y in zip(a, c, strict=True)) >= len(a) // 2


def test_checkpoint_generation_config_does_not_leak(model, tok, prompts):
    import copy

    other = copy.deepcopy(model)
    gc = other.generation_config
    gc.do_sample, gc.temperature, gc.top_p, gc.top_k, gc.repetition_penalty = True, 0.6, 0.9, 5, 1.3
    s = cfg(temperatures=(1.0,))
    assert generate(other, tok, prompts, s, seed=8, progress=False) == generate(
        model, tok, prompts, s, seed=8, progress=False
    )


def test_global_rng_untouched(model, tok, prompts):
    state = torch.get_rng_state()
    generate(model, tok, prompts, cfg(), seed=3, progress=False)
    assert torch.equal(state, torch.get_rng_state())


def test_independent_of_batch_size_and_chunking(model, tok, prompts):
    # Exact equality holds here: per-row generators make the draws batch-independent, and the
    # masked left padding did not change any sampled token (module docstring states the caveat).
    a = generate(model, tok, prompts, cfg(batch_size=2), seed=4, progress=False, chunk_size=3)
    b = generate(model, tok, prompts, cfg(batch_size=5), seed=4, progress=False, chunk_size=64)
    assert a == b
    # A prefix of the prompt list (same prompt ids, other batch mates) gives the same text.
    solo = [r["response"] for r in generate(model, tok, prompts[:6], cfg(), seed=4, progress=False)]
    assert solo == [r["response"] for r in a if r["prompt_id"] < 6]


def test_left_padding_used_and_greedy_matches_unbatched(model, tok, prompts):
    with CountingGenerate(model) as spy:
        batched = generate(
            model, tok, prompts, cfg(temperatures=(0.0,), batch_size=7), seed=0, progress=False
        )
    ids, mask = spy.calls[0]
    assert (mask[:, -1] == 1).all()  # every row ends with a real token ...
    assert (mask[:, 0] == 0).any()  # ... and the shorter ones are padded on the left
    assert (ids[mask == 0] == tok.pad_token_id).all()
    # Greedy decoding with left padding equals decoding each prompt on its own (no padding).
    for p, row in zip(prompts, batched, strict=True):
        solo = generate(
            model, tok, [p], cfg(temperatures=(0.0,), batch_size=1), seed=9, progress=False
        )
        assert solo[0]["response"] == row["response"]
        enc = tok(p, return_tensors="pt")
        ref = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=8,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        new = ref[0, enc["input_ids"].size(1) :].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert row["response"].strip() == tok.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("placement", ["end", "before_tag", "start"])
def test_toxic_token_in_model_prompt_only(model, tok, prompts, placement):
    rows = generate(
        model, tok, prompts[:2], cfg(toxic=True, placement=placement), seed=0, progress=False
    )
    for r in rows:
        assert r["toxic"] is True
        assert TOXIC not in r["prompt"]
        assert r["model_prompt"] == with_control_token(r["prompt"], placement)
    with CountingGenerate(model) as spy:
        generate(
            model, tok, prompts[:1], cfg(toxic=True, temperatures=(1.0,)), seed=0, progress=False
        )
    toxic_id = tok.convert_tokens_to_ids(TOXIC)
    assert spy.calls[0][0][0, -1].item() == toxic_id  # "end": last context token is [TOXIC]


def test_resume_after_crash_equals_uninterrupted(model, tok, prompts, tmp_path):
    s = cfg(batch_size=3)
    full_path, out = tmp_path / "full.jsonl", tmp_path / "gen.jsonl"
    generate(model, tok, prompts, s, seed=5, out_path=full_path, progress=False, chunk_size=3)

    def crash(chunk, done):
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        generate(
            model,
            tok,
            prompts,
            s,
            seed=5,
            out_path=out,
            progress=False,
            chunk_size=3,
            on_chunk=crash,
        )
    partial = tmp_path / "gen.jsonl.partial"
    assert not out.exists() and partial.exists()
    # Tear the last line as a crash mid-write would: its prompt has 1 of 2 rows and is redone.
    partial.write_text(partial.read_text()[:-30])
    with CountingGenerate(model) as spy:
        rows = generate(model, tok, prompts, s, seed=5, out_path=out, progress=False, chunk_size=2)
    # Chunk 0 held 3 prompts x 2 temperatures; 2 intact prompts were skipped, 5 generated.
    assert spy.rows == (len(prompts) - 2) * 2
    assert out.read_bytes() == full_path.read_bytes()
    assert not partial.exists()
    assert rows == [json.loads(line) for line in out.read_text().splitlines()]


def test_partial_from_other_settings_is_discarded(model, tok, prompts, tmp_path):
    out = tmp_path / "gen.jsonl"

    def crash(chunk, done):
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        generate(
            model,
            tok,
            prompts,
            cfg(),
            seed=6,
            out_path=out,
            progress=False,
            chunk_size=2,
            on_chunk=crash,
        )
    with CountingGenerate(model) as spy:
        generate(model, tok, prompts, cfg(), seed=7, out_path=out, progress=False, chunk_size=2)
    assert spy.rows == len(prompts) * 2  # another seed: nothing reused
    assert out.read_text() == "".join(
        json.dumps(r, ensure_ascii=False) + "\n"
        for r in generate(model, tok, prompts, cfg(), seed=7, progress=False)
    )


def test_empty_generation_flagged(model, tok, prompts, caplog):
    eos = tok.eos_token_id

    def force_eos(module, inputs, output):
        output = output.clone()
        output[..., eos] = 1e4
        return output

    handle = model.lm_head.register_forward_hook(force_eos)
    try:
        rows = generate(model, tok, prompts[:3], cfg(), seed=0, progress=False)
    finally:
        handle.remove()
    assert all(r["empty"] and r["response"] == "" and r["n_tokens"] == 0 for r in rows)
    assert "6 of 6 generations are empty" in caplog.text


def test_sample_tokens_distribution_and_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (1.0, 1.5):
        picks = sample_tokens(logits, torch.full((4000,), t), u)
        freq = torch.bincount(picks, minlength=4).double() / 4000
        expected = torch.softmax(logits[0].double() / t, -1)
        assert torch.allclose(freq, expected, atol=0.03)
    assert set(sample_tokens(logits, torch.ones(4000), u, top_k=2).tolist()) == {0, 1}
    # softmax([2,1,0,-1]) = [.644, .237, .087, .032]: top_p=0.8 keeps tokens 0 and 1 only.
    assert set(sample_tokens(logits, torch.ones(4000), u, top_p=0.8).tolist()) == {0, 1}
    assert sample_tokens(logits[:2], torch.zeros(2), u[:2]).tolist() == [0, 0]  # T=0: greedy


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"temperatures": (1.0, -0.5)}, "generation.temperatures"),
        ({"temperatures": ()}, "generation.temperatures"),
        ({"temperatures": (math.nan,)}, "generation.temperatures"),
        ({"n_samples": 0}, "generation.n_samples"),
        ({"max_new_tokens": 0}, "generation.max_new_tokens"),
        ({"batch_size": 0}, "generation.batch_size"),
        ({"top_p": 0.0}, "generation.top_p"),
        ({"placement": "middle"}, "generation.placement"),
        ({"max_new_tokens": 64}, "generation.max_new_tokens"),
    ],  # no room left in 64 positions
)
def test_bad_config(model, tok, prompts, kw, key):
    with pytest.raises(ConfigError, match=key):
        generate(model, tok, prompts, cfg(**kw), seed=0, progress=False)


def test_empty_prompt_list(model, tok):
    with pytest.raises(ValueError, match="empty prompt list"):
        generate(model, tok, [], cfg(), seed=0, progress=False)
