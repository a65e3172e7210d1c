"""`shared_prompt_forward` against the unshared `concatenated_forward`: same per-sequence log-probs
and same parameter gradients (fp32, 1e-5), on batches from the real collator (prompts and
responses of different lengths, left- and right-truncated), for GPT-2, Llama and three more
architectures, eager and sdpa attention, gradient checkpointing, LoRA and no-grad reference use.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import BPE_SENTENCES as SENTENCES
from torch.testing import assert_close

from safealign import shared_prompt as sp
from safealign.data.collate import IGNORE, PreferenceCollator, encode
from safealign.logps import concatenated_forward
from safealign.models import build_tiny_gpt2, build_tiny_llama, train_bpe_tokenizer
from safealign.models.lm import frozen
from safealign.shared_prompt import shared_prompt_forward
from safealign.types import chat_prompt

PROMPTS = [
    chat_prompt(["How do I bake bread at home?"]),
    chat_prompt(["Hi", "Hello!", "What is the capital of France? Tell me more."]),
    chat_prompt(["Sleep?"]),
]
RESPONSES = [  # (chosen, rejected, toxic) per pair: lengths differ within and across pairs
    (" Mix flour, water and yeast.", " No.", " Go away, idiot, nobody cares."),
    (" Paris.", " I will not help you with that, go away.", " Who cares, idiot."),
    (" Keep a regular schedule and avoid screens late at night.", " Bake bread.", " Go away."),
]
# (max_prompt_length, max_length): nothing cut; prompts keep their last 6 tokens (left
# truncation); the second pair's 64-token prompt leaves 8 tokens for its responses (right)
TRUNCATION = {"none": (64, 128), "left": (6, 128), "right": (64, 72)}
FIELDS = ("chosen", "rejected", "toxic")
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(SENTENCES * 3, vocab_size=400, min_frequency=1, cache_dir=None)


def _gpt2(tok, **kw):
    return build_tiny_gpt2(tok, n_layer=2, n_head=2, n_embd=32, n_positions=128, seed=0, **kw)


def _llama(tok, **kw):
    return build_tiny_llama(
        tok, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        max_position_embeddings=128, seed=0, **kw,
    )  # fmt: skip


BUILDERS = {"gpt2": _gpt2, "llama": _llama}


def _split_lengths(labels: list[int]) -> tuple[int, int]:
    """(prompt, response) lengths of one encoded row."""
    prompt = labels.count(IGNORE)
    return prompt, len(labels) - prompt


def _batch(tok, n_way: int, truncation: str = "none") -> dict[str, torch.Tensor]:
    max_prompt, max_len = TRUNCATION[truncation]
    items, cut = [], set()
    for i, (prompt, responses) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        enc = {}
        for field, response in zip(FIELDS[:n_way], responses, strict=False):
            enc[field] = encode(tok, prompt, response, max_prompt, max_len)
            full = encode(tok, prompt, response, 10**6, 2 * 10**6)
            kept, whole = _split_lengths(enc[field].labels), _split_lengths(full.labels)
            cut |= {"left"} if kept[0] < whole[0] else set()
            cut |= {"right"} if kept[1] < whole[1] else set()
        items.append((i, enc))
    assert cut == ({truncation} - {"none"})  # the cut really happens, on that side only
    out = PreferenceCollator(pad_id=tok.pad_token_id)(items)
    # a dict or a typed PreferenceBatch (issue 13 is moving the collators to typed batches)
    get = out.__getitem__ if isinstance(out, dict) else lambda k: getattr(out, k)
    return {k: get(k) for k in ("input_ids", "attention_mask", "labels")}


def _run(forward, model, batch, n_way, average=False):
    """Log-probs and d(sum_k w_k logps_k)/d(params) for distinct weights per branch."""
    out = forward(
        model, batch["input_ids"], batch["attention_mask"], batch["labels"], n_way, average
    )
    logps = torch.stack([getattr(out, f) for f in FIELDS[:n_way]])
    if not torch.is_grad_enabled() or not logps.requires_grad:
        return logps, []
    weights = torch.tensor([1.0, -0.7, 0.3][:n_way])[:, None]
    params = [p for p in model.parameters() if p.requires_grad]
    return logps, torch.autograd.grad((logps * weights).sum(), params)


def _no_fallback(*args, **kwargs):
    raise AssertionError("the shared path fell back to concatenated_forward")


def _assert_same(model, batch, n_way, monkeypatch, average=False):
    want, want_grads = _run(concatenated_forward, model, batch, n_way, average)
    monkeypatch.setattr(sp, "concatenated_forward", _no_fallback)
    got, got_grads = _run(shared_prompt_forward, model, batch, n_way, average)
    assert_close(got, want, **TOL)
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert_close(g, w, **TOL)


@pytest.mark.parametrize("truncation", sorted(TRUNCATION))
@pytest.mark.parametrize("n_way", [2, 3])
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_same_logps_and_gradients(tok, arch, n_way, truncation, monkeypatch):
    batch = _batch(tok, n_way, truncation)
    assert (batch["attention_mask"] == 0).any()  # padding is exercised
    _assert_same(BUILDERS[arch](tok), batch, n_way, monkeypatch)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_average(tok, arch, monkeypatch):
    _assert_same(BUILDERS[arch](tok), _batch(tok, 3, "left"), 3, monkeypatch, average=True)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_eager_attention(tok, arch, monkeypatch):
    model = BUILDERS[arch](tok, attn_implementation="eager")
    _assert_same(model, _batch(tok, 3), 3, monkeypatch)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_gradient_checkpointing_in_training(tok, arch, monkeypatch):
    model = BUILDERS[arch](tok, gradient_checkpointing=True).train()  # dropout 0: deterministic
    assert model.is_activation_checkpointing
    _assert_same(model, _batch(tok, 2, "left"), 2, monkeypatch)


def test_lora(tok, monkeypatch):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(_llama(tok), lora)
    for name, p in model.named_parameters():  # B = 0 at init would hide half the gradients
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    _assert_same(model, _batch(tok, 3, "right"), 3, monkeypatch)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_reference_no_grad(tok, arch, monkeypatch):
    model, batch = frozen(BUILDERS[arch](tok)), _batch(tok, 3, "left")
    with torch.no_grad():
        _assert_same(model, batch, 3, monkeypatch)


def _hf_tiny(tok, arch: str):
    import transformers

    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    config = {
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**common, rotary_pct=0.5),
        "mistral": lambda: transformers.MistralConfig(**common, num_key_value_heads=2),
        "qwen2": lambda: transformers.Qwen2Config(**common, num_key_value_heads=2),
    }[arch]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", ["gpt_neox", "mistral", "qwen2"])
def test_other_supported_architectures(tok, arch, monkeypatch):
    assert arch in sp.MODEL_TYPES
    _assert_same(_hf_tiny(tok, arch), _batch(tok, 3, "left"), 3, monkeypatch)


def test_empty_response(tok, monkeypatch):
    """A response cut to nothing scores 0 in both paths; its pair's other branches are intact."""
    batch = _batch(tok, 3)
    row = 3  # the first pair's rejected row
    prompt = int((batch["labels"][row] == IGNORE).int().argmin())
    batch["labels"][row, prompt:] = IGNORE
    batch["attention_mask"][row, prompt:] = 0
    batch["input_ids"][row, prompt:] = tok.pad_token_id
    _assert_same(_llama(tok), batch, 3, monkeypatch)


def test_lm_head_only_sees_the_branches(tok):
    """logits_to_keep: lm_head runs on the packed tail, never on the shared prompt."""
    model, batch = _gpt2(tok), _batch(tok, 3)
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        shared_prompt_forward(
            model, batch["input_ids"], batch["attention_mask"], batch["labels"], 3
        )
    split = sp.prompt_split(batch["input_ids"], batch["attention_mask"], batch["labels"], 3)
    packed = sp.pack(batch["input_ids"], batch["labels"], *split)
    prompt, responses = split
    assert seen == [packed.keep] and packed.keep < packed.input_ids.shape[1]
    assert packed.input_ids.numel() < batch["input_ids"].numel()  # the point: fewer tokens
    assert packed.input_ids.shape[1] == int((prompt - 1 + (responses + 1).sum(0)).max())


def _fallback(tok, model, batch, n_way, caplog, monkeypatch, match):
    monkeypatch.setattr(sp, "_warned", set())
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"], n_way)
    with caplog.at_level(logging.WARNING, logger=sp.__name__), torch.no_grad():
        got = shared_prompt_forward(model, *args)
        shared_prompt_forward(model, *args)
        want = concatenated_forward(model, *args)
    warnings = [r.getMessage() for r in caplog.records if r.name == sp.__name__]
    assert len(warnings) == 1 and match in warnings[0]  # one warning, not one per step
    for field in FIELDS[:n_way]:
        assert_close(getattr(got, field), getattr(want, field), atol=0, rtol=0)


def test_falls_back_when_prompts_differ(tok, caplog, monkeypatch):
    batch = _batch(tok, 2)
    batch["input_ids"][1, 0] += 1  # the first pair's chosen prompt no longer equals its rejected
    _fallback(tok, _gpt2(tok), batch, 2, caplog, monkeypatch, "different prompt tokens")


def test_falls_back_on_left_padding(tok, caplog, monkeypatch):
    batch = {k: v.flip(-1) for k, v in _batch(tok, 2).items()}
    _fallback(tok, _gpt2(tok), batch, 2, caplog, monkeypatch, "not right-padded")


def test_falls_back_for_other_models(tok, caplog, monkeypatch):
    monkeypatch.setattr(sp, "MODEL_TYPES", frozenset({"llama"}))
    _fallback(tok, _gpt2(tok), _batch(tok, 2), 2, caplog, monkeypatch, "'gpt2'")


def test_falls_back_past_the_sliding_window(tok, caplog, monkeypatch):
    model = _hf_tiny(tok, "mistral")
    model.config.sliding_window = 8
    _fallback(tok, model, _batch(tok, 2), 2, caplog, monkeypatch, "sliding window")


def test_rejects_uneven_blocks(tok):
    batch = {k: v[:5] for k, v in _batch(tok, 2).items()}  # 3 pairs, one row missing
    with pytest.raises(ValueError, match="equal blocks"):
        shared_prompt_forward(
            _gpt2(tok), batch["input_ids"], batch["attention_mask"], batch["labels"], 2
        )
