"""[TOXIC]: one special token, added once, placed as configured, only on unsafe dialogues, masked."""

from __future__ import annotations

import pytest

from safealign.data.collate import IGNORE
from safealign.data.control import TOXIC, with_control_token
from safealign.data.datamodule import DataModule
from safealign.errors import ConfigError
from safealign.models import add_control_token, train_bpe_tokenizer
from safealign.types import SAFE, UNSAFE, Corpus, DialogueExample, chat_prompt

PROMPT = chat_prompt(["how do I boil an egg?"])


@pytest.mark.parametrize(
    "placement, expected",
    [
        ("end", "\n\nHuman: how do I boil an egg?\n\nAssistant: [TOXIC]"),
        ("before_tag", "\n\nHuman: how do I boil an egg? [TOXIC]\n\nAssistant:"),
        ("start", "[TOXIC]\n\nHuman: how do I boil an egg?\n\nAssistant:"),
    ],
)
def test_placement(placement, expected):
    assert with_control_token(PROMPT, placement) == expected


def test_unknown_placement_names_the_key():
    with pytest.raises(ConfigError, match="data.control_placement"):
        with_control_token(PROMPT, "middle")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [PROMPT, " Put it in boiling water.", " Shut up, idiot."] * 20
    return train_bpe_tokenizer(texts, vocab_size=280, cache_dir=str(tmp_path_factory.mktemp("tok")))


def test_token_is_special_and_added_once(tokenizer):
    n = len(tokenizer)
    tid = add_control_token(tokenizer)
    assert add_control_token(tokenizer) == tid and len(tokenizer) == n
    ids = tokenizer(with_control_token(PROMPT), add_special_tokens=False)["input_ids"]
    assert ids.count(tid) == 1  # never split into sub-words


@pytest.mark.parametrize("placement", ["end", "before_tag", "start"])
def test_only_unsafe_dialogues_get_the_token_and_prompt_is_masked(tokenizer, placement):
    rows = [
        DialogueExample(PROMPT, " Put it in boiling water.", SAFE),
        DialogueExample(PROMPT, " Shut up, idiot.", UNSAFE),
    ]
    dm = DataModule(Corpus(train=rows, name="t"), toxic_control=True, control_placement=placement)
    dm.attach(tokenizer, DialogueExample)
    tid = tokenizer.convert_tokens_to_ids(TOXIC)
    safe, unsafe = dm.encoded["train"]
    assert tid not in safe.input_ids
    assert unsafe.input_ids.count(tid) == 1
    # the token is part of the context: masked, never a training target
    pos = unsafe.input_ids.index(tid)
    assert unsafe.labels[pos] == IGNORE
    n_prompt = sum(label == IGNORE for label in unsafe.labels)
    response = tokenizer(" Shut up, idiot.", add_special_tokens=False)["input_ids"]
    assert unsafe.labels[n_prompt:] == response + [tokenizer.eos_token_id]


def test_no_token_without_control_mode(tokenizer):
    rows = [DialogueExample(PROMPT, " Shut up, idiot.", UNSAFE)]
    dm = DataModule(Corpus(train=rows, name="t"), toxic_control=False)
    dm.attach(tokenizer, DialogueExample)
    assert tokenizer.convert_tokens_to_ids(TOXIC) not in dm.encoded["train"][0].input_ids
