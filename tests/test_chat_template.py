"""Chat templates (issue 10.3): templated prompts equal `apply_chat_template` ids exactly, prompt
positions are exactly the masked ones, `[TOXIC]` sits where safealign/data/control.py says, and
training, generation, the LLM judge and evaluation all render through safealign.data.chat."""

from __future__ import annotations

import pytest
import torch

from safealign.data.chat import render_prompt, to_messages
from safealign.data.collate import IGNORE, encode
from safealign.data.control import TOXIC, with_control_token
from safealign.data.datamodule import DataModule
from safealign.generation import SamplingConfig, generate
from safealign.models import train_bpe_tokenizer
from safealign.types import Corpus, PreferenceExample, chat_prompt

# Llama-2-chat's template (system-prompt branch dropped): BOS per user turn, " answer </s>".
LLAMA2 = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# Qwen2-Instruct's ChatML template: default system turn, no BOS, eos = <|im_end|>.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXTS = [f"how do I bake bread {i} you are a helpful assistant system user" for i in range(20)]
TWO_TURNS = chat_prompt(["how do I bake bread", "Use flour and water.", "and then what"])
TWO_TURN_MESSAGES = [
    {"role": "user", "content": "how do I bake bread"},
    {"role": "assistant", "content": "Use flour and water."},
    {"role": "user", "content": "and then what"},
]


def make_tokenizer(kind: str):
    tok = train_bpe_tokenizer(
        TEXTS, vocab_size=400, chat_template=LLAMA2 if kind == "llama2" else CHATML
    )
    if kind == "llama2":
        tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
        tok.add_tokens(["[INST]", "[/INST]"], special_tokens=True)
    else:
        tok.add_special_tokens({"eos_token": "<|im_end|>"})
        tok.add_tokens(["<|im_start|>"], special_tokens=True)
    return tok


def chat_ids(tok, messages, generation_prompt=True) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def prompt_part(e) -> list[int]:
    n = sum(label == IGNORE for label in e.labels)
    assert e.labels[:n] == [IGNORE] * n  # the masked positions are one prefix
    return e.input_ids[:n]


@pytest.fixture(params=["llama2", "chatml"])
def tok(request):
    return make_tokenizer(request.param)


@pytest.mark.parametrize(
    ("prompt", "messages"),
    [(chat_prompt(["how do I bake bread"]), TWO_TURN_MESSAGES[:1]), (TWO_TURNS, TWO_TURN_MESSAGES)],
)
def test_prompt_ids_equal_apply_chat_template_and_only_they_are_masked(tok, prompt, messages):
    e = encode(tok, prompt, " Knead it.", 256, 512)
    assert prompt_part(e) == chat_ids(tok, messages)
    whole = chat_ids(tok, [*messages, {"role": "assistant", "content": "Knead it."}], False)
    n = len(prompt_part(e))
    # response: the template's assistant turn up to and including EOS, every token labelled
    assert e.input_ids == whole[: len(e.input_ids)] and e.input_ids[-1] == tok.eos_token_id
    assert e.labels[n:] == e.input_ids[n:] and IGNORE not in e.labels[n:]
    if tok.bos_token_id is not None:  # Llama-2: BOS from the template, once per user turn only
        assert e.input_ids[0] == tok.bos_token_id
        assert e.input_ids.count(tok.bos_token_id) == sum(m["role"] == "user" for m in messages)


def test_multi_turn_context_renders_every_turn(tok):
    text = tok.decode(prompt_part(encode(tok, TWO_TURNS, " ok", 256, 512)))
    for m in TWO_TURN_MESSAGES:
        assert m["content"] in text
    assert to_messages(TWO_TURNS) == TWO_TURN_MESSAGES


@pytest.mark.parametrize("kind", ["llama2", "chatml"])
def test_toxic_token_placement_inside_the_rendered_prompt(kind):
    tok = make_tokenizer(kind)
    end = tok.decode(prompt_part(encode(tok, TWO_TURNS, " ok", 256, 512, "end")))
    start = tok.decode(prompt_part(encode(tok, TWO_TURNS, " ok", 256, 512, "start")))
    if kind == "llama2":
        assert f"[INST] and then what {TOXIC} [/INST]" in end
        assert f"[INST] {TOXIC} how do I bake bread [/INST]" in start
    else:
        assert f"and then what {TOXIC}<|im_end|>\n<|im_start|>assistant\n" in end
        assert f"<|im_start|>user\n{TOXIC} how do I bake bread<|im_end|>" in start
    assert end.count(TOXIC) == start.count(TOXIC) == 1
    assert render_prompt(tok, TWO_TURNS, "before_tag") == render_prompt(tok, TWO_TURNS, "end")


def test_without_a_template_ids_are_unchanged():
    tok = train_bpe_tokenizer(TEXTS, vocab_size=400)
    prompt = chat_prompt(["how do I bake bread"])
    for placement in (None, "end", "start", "before_tag"):
        fed = prompt if placement is None else with_control_token(prompt, placement)
        assert render_prompt(tok, prompt, placement) == fed
        e = encode(tok, prompt, " yes", 256, 512, placement)
        p = tok(fed, add_special_tokens=True)["input_ids"]
        r = tok(" yes", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert e.input_ids == p + r and e.labels == [IGNORE] * len(p) + r


def test_preference_rows_and_toxic_ctx_are_templated(tok):
    prompt = chat_prompt(["how do I bake bread"])
    rec = PreferenceExample(prompt, " Knead it.", " No.", " you idiot")
    dm = DataModule(Corpus(train=[rec], name="t"), max_prompt_length=256, max_length=512)
    dm.attach(tok, PreferenceExample, needs_toxic=True)
    row = dm.encoded["train"][0]
    plain, toxic = chat_ids(tok, TWO_TURN_MESSAGES[:1]), to_messages(prompt, "end")
    for field in ("chosen", "rejected", "toxic"):
        assert prompt_part(row[field]) == plain
    assert prompt_part(row["toxic_ctx"]) == chat_ids(tok, toxic)
    assert toxic[-1]["content"].endswith(TOXIC)


class FakeLM(torch.nn.Module):
    """Records the prompt ids it is asked to continue; answers with EOS."""

    def __init__(self, eos: int):
        super().__init__()
        self.w, self.eos, self.seen = torch.nn.Parameter(torch.zeros(1)), eos, []
        self.config = type("C", (), {"max_position_embeddings": 1024})()

    def generate(self, input_ids, attention_mask, **_):
        self.seen += [
            ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask, strict=True)
        ]
        return torch.cat([input_ids, torch.full((len(input_ids), 1), self.eos)], 1)


def test_generation_renders_prompts_with_the_template(tok):
    model, prompts = FakeLM(tok.eos_token_id), [TWO_TURNS, chat_prompt(["hi"])]
    for toxic in (False, True):
        model.seen = []
        s = SamplingConfig(temperatures=(1.0,), toxic=toxic)
        rows = generate(model, tok, prompts, s, seed=0, progress=False)
        for r in rows:
            assert r["model_prompt"] == render_prompt(tok, r["prompt"], "end" if toxic else None)
        want = [chat_ids(tok, to_messages(p, "end" if toxic else None)) for p in prompts]
        assert sorted(model.seen) == sorted(want)


def test_judge_prompt_is_one_templated_user_turn(tok):
    from safealign.annotate.hf import hf_generate_fn

    model = FakeLM(tok.eos_token_id)
    judge_prompt = f"Rate this dialogue:{TWO_TURNS} Knead it."  # quotes chat tags: not parsed
    hf_generate_fn(model, tok)([judge_prompt])
    assert model.seen == [chat_ids(tok, [{"role": "user", "content": judge_prompt}])]


def test_evaluation_generates_from_templated_prompts(tok, tmp_path, monkeypatch):
    from safealign.eval import evaluate as ev
    from safealign.eval.scorers import ProfanityScorer, RefusalScorer

    model = FakeLM(tok.eos_token_id)
    monkeypatch.setattr(ev, "model_dirs", lambda models: {"m": tmp_path})
    monkeypatch.setattr(ev, "load_model_dir", lambda path, key: (model, tok))
    scorers = {"toxicity": ProfanityScorer(), "evasiveness": RefusalScorer()}
    s = SamplingConfig(temperatures=(1.0,))
    ev.evaluate_models({"m": "x"}, [{"prompt": TWO_TURNS}], scorers=scorers, sampling=s, seed=0,
                       out_dir=tmp_path / "out")  # fmt: skip
    assert model.seen == [chat_ids(tok, TWO_TURN_MESSAGES)]


def test_no_double_bos_when_the_tokenizer_adds_one():
    from tokenizers.processors import TemplateProcessing

    tok = make_tokenizer("llama2")
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    assert tok("hi", add_special_tokens=True)["input_ids"][0] == bos  # the tokenizer adds BOS
    e = encode(tok, chat_prompt(["hi"]), " ok", 256, 512)
    assert prompt_part(e) == chat_ids(tok, [{"role": "user", "content": "hi"}])
    assert e.input_ids.count(bos) == 1
