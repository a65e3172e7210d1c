"""Log-prob helper, concatenated forward, `encode` truncation and `PreferenceCollator` stacking.

`sequence_logps` is checked against a per-token Python loop and against the implementation before
issue 10 (kept below as `today_logps`: values and gradients, fp32 and bf16, every chunking);
`concatenated_forward` against separate unpadded forwards of a tiny GPT-2 (right padding must not
change a row's log-prob).
"""

from __future__ import annotations

import pytest
import torch
from conftest import BPE_SENTENCES as SENTENCES
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from safealign.data.collate import IGNORE, PreferenceCollator, encode
from safealign.data.control import TOXIC, with_control_token
from safealign.logps import concatenated_forward, sequence_logps, token_logps
from safealign.models import build_tiny_gpt2, train_bpe_tokenizer
from safealign.types import chat_prompt

PROMPT = chat_prompt(["How do I bake bread at home?"])
CHOSEN, REJECTED, TOXIC_RESPONSE = (
    " Mix flour, water and yeast.",
    " No.",
    " Go away, idiot, nobody cares.",
)


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(SENTENCES * 3, vocab_size=400, min_frequency=1, cache_dir=None)


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_gpt2(tok, n_layer=2, n_head=2, n_embd=32, n_positions=64, seed=0).eval()


def brute_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool) -> torch.Tensor:
    out = []
    for row in range(labels.shape[0]):
        terms = [
            torch.log_softmax(logits[row, pos].double(), -1)[int(labels[row, pos + 1])].item()
            for pos in range(labels.shape[1] - 1)
            if labels[row, pos + 1] != IGNORE
        ]
        total = sum(terms)
        out.append(total / len(terms) if average and terms else total)
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_per_token_loop(average):
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 9, 17, generator=gen)
    labels = torch.randint(0, 17, (4, 9), generator=gen)
    for row, (prompt_len, pad) in enumerate([(1, 0), (3, 2), (5, 1), (9, 0)]):
        labels[row, :prompt_len] = IGNORE
        labels[row, labels.shape[1] - pad :] = IGNORE
    got = sequence_logps(logits, labels, average=average)
    assert got.shape == (4,)
    assert_close(got, brute_logps(logits, labels, average))
    assert got[3].item() == 0.0  # a fully masked row contributes nothing (no division by zero)


def today_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool) -> torch.Tensor:
    """`sequence_logps` before issue 10, verbatim: an fp32 copy and log-softmax of all logits."""
    logits = logits[:, :-1, :]
    labels = labels[:, 1:]
    mask = labels != IGNORE
    safe_labels = labels.masked_fill(~mask, 0)
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe_labels.unsqueeze(-1))
    token_logps = token_logps.squeeze(-1) * mask
    total = token_logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def _case(dtype: torch.dtype, vocab: int = 50):
    gen = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(4, 12, vocab, generator=gen)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (4, 12), generator=gen)
    labels[0, :4] = IGNORE  # prompt
    labels[1, 7:] = IGNORE  # padding
    labels[2, :] = IGNORE  # nothing to score
    return logits, labels, torch.tensor([1.0, -0.5, 2.0, 0.25])  # backward weights per row


def _value_and_grad(fn, logits, labels, weights, **kw):
    out = fn(logits, labels, **kw)
    (grad,) = torch.autograd.grad((out * weights).sum(), logits)
    return out, grad


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [1, 3 * 50, None])  # a row, 3 rows, the default
def test_same_values_and_gradients_as_today(average, dtype, chunk_elements):
    logits, labels, w = _case(dtype)

    def lean(x, y, average):
        total = token_logps(x, y, chunk_elements).sum(-1)
        return total / (y[:, 1:] != IGNORE).sum(-1).clamp(min=1) if average else total

    want, want_grad = _value_and_grad(today_logps, logits, labels, w, average=average)
    got, got_grad = _value_and_grad(lean, logits, labels, w, average=average)
    assert got.dtype == torch.float32 and got_grad.dtype == dtype
    assert_close(got, want, atol=1e-5, rtol=1e-5)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}  # bf16: its own eps
    assert_close(got_grad, want_grad, **tol)
    assert got_grad[2].abs().sum() == 0 and got_grad[0, :3].abs().sum() == 0  # masked: no grad
    if chunk_elements is None:  # the public helper is this path
        assert_close(sequence_logps(logits, labels, average), got, atol=0, rtol=0)


def test_everything_masked_gives_zeros():
    logits, labels, w = _case(torch.float32)
    labels[:] = IGNORE
    out, grad = _value_and_grad(sequence_logps, logits, labels, w)
    assert out.tolist() == [0.0] * 4 and grad.abs().sum() == 0


class _LargestTensor(TorchDispatchMode):
    """Bytes of the largest tensor any op creates while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = [*args, *(kwargs or {}).values()]
        seen = {_ptr(t) for t in flat_in if isinstance(t, torch.Tensor)}  # views and in-place ops
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and _ptr(t) not in seen:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_full_size_temporaries(dtype):
    """Forward creates nothing near the logits' size (today: an fp32 copy and a log-softmax);
    backward creates the gradient it must return and nothing larger. Saved for backward: the
    logits themselves plus a few numbers per position."""
    vocab = 1000
    logits, labels, w = _case(dtype, vocab)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with _LargestTensor() as fwd:
            out = token_logps(logits, labels, chunk_elements=2 * vocab)
    assert fwd.largest <= 2 * vocab * 4  # one fp32 chunk of two rows
    own = [t for t in saved if _ptr(t) != _ptr(logits)]
    assert sum(t.numel() * t.element_size() for t in own) <= 16 * labels.numel()
    with _LargestTensor() as bwd:
        out.mul(w[:, None]).sum().backward()
    assert bwd.largest == logits.numel() * logits.element_size()  # the gradient itself
    with _LargestTensor() as today:
        today_logps(logits.detach(), labels, average=False)
    assert today.largest >= logits[:, :-1].numel() * 4  # what the lean path avoids


def _items(tok, with_toxic: bool, n: int = 2) -> list:
    """n preference items of different lengths, as the datamodule builds them."""
    prompts = [PROMPT, chat_prompt(["Hi", "Hello!", "What is the capital of France?"])][:n]
    items = []
    for i, prompt in enumerate(prompts):
        enc = {
            "chosen": encode(tok, prompt, CHOSEN + " Then wait." * i, 32, 60),
            "rejected": encode(tok, prompt, REJECTED, 32, 60),
        }
        if with_toxic:
            enc["toxic"] = encode(tok, prompt, TOXIC_RESPONSE, 32, 60)
            enc["toxic_ctx"] = encode(tok, with_control_token(prompt), TOXIC_RESPONSE, 32, 60)
        items.append((i, enc))
    return items


def _separate_logps(model, encoded) -> float:
    ids = torch.tensor([encoded.input_ids])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return sequence_logps(logits, torch.tensor([encoded.labels])).item()


@pytest.mark.parametrize("n_way", [2, 3])
def test_concatenated_forward_equals_separate_unpadded_forwards(tok, model, n_way):
    items = _items(tok, with_toxic=n_way == 3)
    batch = PreferenceCollator(pad_id=tok.pad_token_id)(items)._asdict()
    assert (batch["attention_mask"] == 0).any()  # right padding is really exercised
    with torch.no_grad():
        got = concatenated_forward(
            model, batch["input_ids"], batch["attention_mask"], batch["labels"], n_way
        )
        fields = ["chosen", "rejected", "toxic"][:n_way]
        for field in fields:
            expected = torch.tensor([_separate_logps(model, enc[field]) for _, enc in items])
            assert_close(getattr(got, field), expected, atol=1e-5, rtol=1e-5)
    assert (got.toxic is None) == (n_way == 2)


def test_concatenated_forward_rejects_uneven_blocks(tok, model):
    batch = PreferenceCollator(pad_id=tok.pad_token_id)(_items(tok, with_toxic=False))._asdict()
    with pytest.raises(ValueError, match="equal blocks"):
        concatenated_forward(model, batch["input_ids"], batch["attention_mask"], batch["labels"], 3)


def test_encode_without_truncation(tok):
    p = tok(PROMPT)["input_ids"]
    r = tok(CHOSEN, add_special_tokens=False)["input_ids"]
    enc = encode(tok, PROMPT, CHOSEN, 32, 64)
    assert enc.input_ids == p + r + [tok.eos_token_id]  # EOS appended
    assert enc.labels == [IGNORE] * len(p) + r + [tok.eos_token_id]  # -100 exactly on the prompt
    assert not enc.truncated


def test_encode_prompt_keeps_end_and_response_keeps_start(tok):
    p = tok(PROMPT)["input_ids"]
    r = tok(CHOSEN, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(p) > 4 and len(r) > 4
    enc = encode(tok, PROMPT, CHOSEN, max_prompt_length=4, max_length=8)
    assert enc.input_ids == p[-4:] + r[:4]  # the latest prompt tokens, the first response tokens
    assert enc.labels == [IGNORE] * 4 + r[:4]
    assert enc.truncated
    assert enc.input_ids[-1] != tok.eos_token_id  # EOS only when it fits
    # Exactly enough room: the EOS is kept and nothing counts as truncated.
    exact = encode(tok, PROMPT, CHOSEN, max_prompt_length=len(p), max_length=len(p) + len(r))
    assert exact.input_ids[-1] == tok.eos_token_id and not exact.truncated


def test_toxic_control_token_is_one_token(tok):
    toxic_id = tok.convert_tokens_to_ids(TOXIC)
    assert tok(TOXIC, add_special_tokens=False)["input_ids"] == [toxic_id]
    ctx = encode(tok, with_control_token(PROMPT), TOXIC_RESPONSE, 40, 64)
    assert ctx.input_ids.count(toxic_id) == 1
    position = ctx.input_ids.index(toxic_id)
    assert ctx.labels[position] == IGNORE  # part of the context, never a training target
    # The response tokens after the control token are the same as without it.
    plain = encode(tok, PROMPT, TOXIC_RESPONSE, 40, 64)
    assert [x for x in ctx.labels if x != IGNORE] == [x for x in plain.labels if x != IGNORE]


def _unpadded(row: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return row[mask.bool()].tolist()


@pytest.mark.parametrize("with_toxic", [False, True])
def test_preference_collator_stacks_blocks(tok, with_toxic):
    items = _items(tok, with_toxic)
    batch = PreferenceCollator(pad_id=tok.pad_token_id)(items)._asdict()
    fields = ["chosen", "rejected"] + (["toxic"] if with_toxic else [])
    n, length = len(items), batch["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (len(fields) * n, length)
    for block, field in enumerate(fields):  # rows [chosen_0..n; rejected_0..n(; toxic_0..n)]
        for i, (_, enc) in enumerate(items):
            row = block * n + i
            assert (
                _unpadded(batch["input_ids"][row], batch["attention_mask"][row])
                == enc[field].input_ids
            )
            size = len(enc[field].input_ids)
            assert batch["labels"][row, :size].tolist() == enc[field].labels
            assert (batch["labels"][row, size:] == IGNORE).all()
            assert (batch["input_ids"][row, size:] == tok.pad_token_id).all()
    assert batch["index"].tolist() == [0, 1]
    ctx = batch["toxic_ctx"]  # Rows(input_ids, attention_mask, labels) or None
    assert (ctx is not None) == with_toxic
    if with_toxic:
        assert ctx.input_ids.shape[0] == n
        for i, (_, enc) in enumerate(items):
            ids = _unpadded(ctx.input_ids[i], ctx.attention_mask[i])
            assert ids == enc["toxic_ctx"].input_ids


@pytest.mark.parametrize("reference_batch_size", [None, 3])
def test_reference_precompute_has_its_own_batch_size(tmp_path, monkeypatch, reference_batch_size):
    """`method.reference_batch_size` sets the precompute's batch (no grad); null keeps the data
    module's. Either way the cached numbers are the same."""
    from test_preference import rows, setup

    from safealign.methods import reference as ref

    seen, real = [], ref.sharded_reference
    monkeypatch.setattr(
        ref, "sharded_reference", lambda *a, **k: seen.append(a[3]) or real(*a, **k)
    )
    texts = [t for r in rows() for t in (r.prompt, r.chosen, r.rejected, r.toxic)]
    tok = train_bpe_tokenizer(texts, vocab_size=300, cache_dir=None)
    caches = {}
    for bs in (None, reference_batch_size):
        dm, module, trainer = setup(tok, tmp_path / str(bs), reference_batch_size=bs)
        trainer.fit(module, datamodule=dm)
        caches[bs] = module.ref_cache
    assert seen[-2:] == [reference_batch_size or dm.batch_size, reference_batch_size or 4]
    for split, fields in caches[None].items():
        for k, v in fields.items():
            assert_close(caches[reference_batch_size][split][k], v, atol=1e-5, rtol=1e-5)
