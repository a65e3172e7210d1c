"""Training-data hygiene (issue 14, item 6): empty prompts dropped and counted, duplicates and
train/validation overlap counted (overlap removed from validation by default), and an empty
training set names every drop. Fixtures are written in the real formats (fixtures_writers)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_writers import DIASAFETY_SPLITS, PREF_ROWS, write_diasafety, write_jsonl_file

from safealign.data.datamodule import DataModule, is_blank_prompt
from safealign.data.sources import load_diasafety, load_jsonl
from safealign.errors import ConfigError
from safealign.models import train_bpe_tokenizer
from safealign.types import DialogueExample, PreferenceExample, chat_prompt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [t for r in PREF_ROWS for t in r.values()]
    return train_bpe_tokenizer(texts, vocab_size=300)


def test_blank_prompt_means_no_text_besides_the_chat_tags():
    assert is_blank_prompt(chat_prompt([""])) and is_blank_prompt(chat_prompt(["  \n"]))
    assert is_blank_prompt("")
    assert not is_blank_prompt(chat_prompt(["hi"]))
    assert not is_blank_prompt(chat_prompt(["hi", "hello", ""]))  # earlier turns are text


@pytest.mark.parametrize("blank", ["", "   ", "\n\t"])
def test_empty_prompt_preference_rows_are_dropped_counted_and_logged(
    tmp_path, tokenizer, caplog, blank
):
    rows = [*PREF_ROWS, {**PREF_ROWS[0], "prompt": blank}]
    path = write_jsonl_file(tmp_path, "prefs.jsonl", rows)
    dm = DataModule(load_jsonl(path), val_fraction=0.0)
    assert len(dm.corpus.train) == len(PREF_ROWS)
    assert dm.stats["dropped_empty_prompt"] == 1
    caplog.set_level(logging.INFO, logger="safealign.data.datamodule")
    dm.attach(tokenizer, PreferenceExample, needs_toxic=True)
    assert len(dm.encoded["train"]) == len(PREF_ROWS)
    assert "data: dropped_empty_prompt = 1" in caplog.text
    assert "data: duplicate_train_rows = 0" in caplog.text


def test_empty_dialogue_contexts_are_dropped_in_every_split(tmp_path):
    blank = {**DIASAFETY_SPLITS["train"][0], "context": " "}
    splits = {k: [*v, blank] for k, v in DIASAFETY_SPLITS.items()}
    dm = DataModule(load_diasafety(write_diasafety(tmp_path, splits)))
    for split in ("train", "val", "test"):
        kept = getattr(dm.corpus, split)
        assert all(isinstance(r, DialogueExample) and r.context.strip() for r in kept)
    assert dm.stats["dropped_empty_prompt"] == 3


def _overlapping_splits() -> dict:
    train = DIASAFETY_SPLITS["train"]
    return {
        "train": [*train, train[0]],  # one exact duplicate
        "val": [*DIASAFETY_SPLITS["val"], train[1], train[3]],  # two rows also in train
        "test": [*DIASAFETY_SPLITS["test"], train[1]],
    }


def test_duplicates_and_overlap_are_counted_and_removed_from_validation(tmp_path):
    dm = DataModule(
        load_diasafety(write_diasafety(tmp_path, _overlapping_splits())), dedup_val=True
    )
    assert dm.stats["duplicate_train_rows"] == 1
    assert dm.stats["val_overlap_with_train"] == 2
    assert dm.stats["test_overlap_with_train"] == 1
    assert len(dm.corpus.train) == 4  # 5 rows, the empty response dropped, the duplicate kept
    assert len(dm.corpus.val) == len(DIASAFETY_SPLITS["val"])
    assert not set(dm.corpus.val) & set(dm.corpus.train)
    assert len(dm.corpus.test) == len(DIASAFETY_SPLITS["test"]) + 1  # test is counted, kept


def test_without_dedup_val_the_overlap_is_counted_kept_and_warned(tmp_path, caplog):
    dm = DataModule(load_diasafety(write_diasafety(tmp_path, _overlapping_splits())))
    assert dm.stats["val_overlap_with_train"] == 2
    assert "2 validation rows of diasafety are also train rows" in caplog.text
    assert len(dm.corpus.val) == len(DIASAFETY_SPLITS["val"]) + 2


def test_held_out_slice_of_a_file_with_repeats_is_deduplicated(tmp_path):
    rows = [PREF_ROWS[0]] * 10 + [PREF_ROWS[1]]
    path = write_jsonl_file(tmp_path, "p.jsonl", rows)
    dm = DataModule(load_jsonl(path), val_fraction=0.5, dedup_val=True)
    assert dm.stats["duplicate_train_rows"] > 0
    assert dm.stats["val_overlap_with_train"] > 0
    assert not set(dm.corpus.val) & set(dm.corpus.train)


def test_training_configs_turn_dedup_val_on(make_cfg):
    for data in ("builtin", "builtin_pref", "jsonl", "hh_rlhf", "diasafety", "isaac_builtin"):
        assert make_cfg(f"data={data}").data.dedup_val is True, data


def test_all_identical_pairs_error_names_the_drops(tmp_path):
    rows = [{"prompt": "hi", "chosen": "same", "rejected": " same "}] * 3
    path = write_jsonl_file(tmp_path, "same.jsonl", rows)
    with pytest.raises(ConfigError, match=r"no training records \(dropped: identical_pair=3\)"):
        DataModule(load_jsonl(path))


def test_all_empty_prompts_error_names_the_drops(tmp_path):
    rows = [{**r, "prompt": ""} for r in PREF_ROWS]
    path = write_jsonl_file(tmp_path, "blank.jsonl", rows)
    with pytest.raises(ConfigError, match=r"dropped: empty_prompt=2"):
        DataModule(load_jsonl(path))


def test_nothing_survives_encoding_error_lists_source_and_encoding_drops(tmp_path, tokenizer):
    rows = [*PREF_ROWS, {"prompt": "x", "chosen": "a", "rejected": "a"}]
    dm = DataModule(load_jsonl(write_jsonl_file(tmp_path, "no_toxic.jsonl", rows)))
    dm.corpus.train = [PreferenceExample(r.prompt, r.chosen, r.rejected) for r in dm.corpus.train]
    with pytest.raises(ConfigError, match=r"identical_pair=1, missing_toxic=\d"):
        dm.attach(tokenizer, PreferenceExample, needs_toxic=True)


def test_train_py_all_identical_pairs_exits_2_naming_the_reason(tmp_path):
    rows = [{"prompt": "hi", "chosen": "same", "rejected": "same"}] * 4
    path = write_jsonl_file(tmp_path, "same.jsonl", rows)
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path}/run", "data=jsonl",
           f"data.source.path={path}", "method=dpo", f"paths.cache_dir={tmp_path}/cache"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "same" in r.stderr and "identical_pair=4" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "model").exists()
