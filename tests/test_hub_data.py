"""data=hf: datasets by hub id or path through datasets.load_dataset, all offline.

Hub repos are imitated by local folders laid out as the real ones are (Anthropic/hh-rlhf:
``harmless-base/{train,test}.jsonl.gz``; thu-coai/diasafety: ``{train,val,test}.json`` at the
root), loaded with ``load_dataset(<folder>, data_dir=...)`` and compared with the local loaders.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
from conftest import ROOT, TINY
from fixtures_writers import (
    DIALOGUE_ROWS,
    HH_DROP_ROWS,
    HH_ROWS,
    PREF_ROWS,
    TRL_ROWS,
    write_diasafety,
    write_hf_dataset_dir,
    write_hh,
    write_jsonl_file,
)
from hydra.utils import instantiate
from test_sources import pref_expected, trl_expected

from safealign.data.hub import load_hf_dataset
from safealign.data.sources import load_diasafety, load_hf_dataset_dir, load_hh_rlhf
from safealign.errors import ConfigError, DataError
from safealign.types import DialogueExample, PreferenceExample

H, A = "\n\nHuman:", "\n\nAssistant:"


def hh_repo(root: Path, train: list | None = None) -> Path:
    """``<root>/Anthropic/hh-rlhf`` with harmless-base train/test and a decoy helpful-base."""
    repo = root / "Anthropic" / "hh-rlhf"
    for sub in ("harmless-base", "helpful-base"):
        (repo / sub).mkdir(parents=True)
    write_hh(repo / "harmless-base", "train.jsonl.gz", train or [*HH_ROWS, *HH_DROP_ROWS])
    write_hh(repo / "harmless-base", "test.jsonl.gz", HH_ROWS[:2])
    write_hh(repo / "helpful-base", "train.jsonl.gz", HH_ROWS[2:])
    return repo


def load(path, tmp_path: Path, **kw):
    return load_hf_dataset(str(path), cache_dir=str(tmp_path / "hf_cache"), **kw)


def source_cfg(make_cfg, tmp_path: Path, *overrides: str):
    cfg = make_cfg(*overrides, f"data.source.cache_dir={tmp_path}/hf_cache")
    return cfg, instantiate(cfg.data.source)()


# ------------------------------------------------------------- hub-shaped folders and presets
def test_hh_repo_folder_matches_local_loader(tmp_path):
    repo = hh_repo(tmp_path)
    corpus = load(repo, tmp_path, data_dir="harmless-base", source_name="hh_rlhf")
    expected = load_hh_rlhf(repo / "harmless-base")
    assert corpus.train == expected.train and corpus.test == expected.test and corpus.val == []
    assert corpus.dropped == expected.dropped == {
        "prompt_mismatch": 1, "empty_response": 1, "identical_pair": 1,
    }  # fmt: skip
    sft = load(repo, tmp_path, data_dir="harmless-base", as_dialogues=True, source_name="hh_rlhf")
    assert sft.train == load_hh_rlhf(repo / "harmless-base", as_dialogues=True).train


def test_hh_preset_real_rows(make_cfg, tmp_path, shared_data):
    """A few real harmless-base rows, through data=hh_rlhf_hub with only the path overridden."""
    real = [json.loads(x) for x in _gz_lines(shared_data / "hh_rlhf_harmless_base/test.jsonl.gz")]
    repo = hh_repo(tmp_path, train=real[:40])
    cfg, corpus = source_cfg(make_cfg, tmp_path, "data=hh_rlhf_hub", f"data.source.path={repo}")
    assert cfg.data.source.data_dir == "harmless-base" and cfg.data.source.local_files_only
    expected = load_hh_rlhf(repo / "harmless-base")
    assert corpus.train == expected.train and corpus.dropped == expected.dropped
    assert corpus.name == "hh_rlhf" and {r.source for r in corpus.train} == {"hh_rlhf"}


def _gz_lines(path: Path) -> list[str]:
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line for _, line in zip(range(60), f, strict=False)]


def test_diasafety_preset_on_repo_folder(make_cfg, tmp_path):
    repo = write_diasafety(tmp_path / "thu-coai" / "diasafety")
    cfg, corpus = source_cfg(make_cfg, tmp_path, "data=diasafety_hub", f"data.source.path={repo}")
    expected = load_diasafety(repo)  # val.json -> hub split "validation" -> val
    assert (corpus.train, corpus.val, corpus.test) == (expected.train, expected.val, expected.test)
    assert corpus.dropped == expected.dropped == {"empty_response": 1}
    split = "data.source.split={train:train,test:validation}"  # a Hydra mapping override
    _, corpus = source_cfg(
        make_cfg, tmp_path, "data=diasafety_hub", f"data.source.path={repo}", split
    )
    assert (corpus.train, corpus.val, corpus.test) == (expected.train, [], expected.val)


def test_hub_id_loads_offline_from_cache_and_names_cache_when_missing(tmp_path):
    """A hub id resolves from the datasets cache with the Hub unreachable. The cache entry is the
    one a local load of the same-named repo folder writes, moved to where a hub download of
    ``Anthropic/hh-rlhf`` with ``data_dir=harmless-base`` puts it (datasets' cache layout)."""
    repo = hh_repo(tmp_path / "repo")
    built = tmp_path / "built"
    expected = load_hf_dataset(str(repo), data_dir="harmless-base", cache_dir=str(built))
    (entry,) = built.glob("hh-rlhf/*/*/*/dataset_info.json")
    cache = tmp_path / "hub_cache"
    dest = cache / "Anthropic___hh-rlhf" / "default-data_dir=harmless-base" / "0.0.0"
    shutil.copytree(entry.parent, dest / entry.parent.name)
    corpus = load_hf_dataset("Anthropic/hh-rlhf", data_dir="harmless-base", cache_dir=str(cache))
    assert (corpus.train, corpus.test, corpus.dropped) == (
        expected.train, expected.test, expected.dropped,
    )  # fmt: skip
    for data_dir in ("helpful-base", None):  # not cached: a clear error, nothing fetched
        with pytest.raises(DataError, match="not in the local HF datasets cache") as e:
            load_hf_dataset("Anthropic/hh-rlhf", data_dir=data_dir, cache_dir=str(cache))
        assert "data.source.path='Anthropic/hh-rlhf'" in str(e.value) and str(cache) in str(e.value)
    with pytest.raises(DataError, match=r"data\.source\.path='nobody/nothing'"):
        load_hf_dataset("nobody/nothing", cache_dir=str(cache))


def test_save_to_disk_folder_matches_load_hf_dataset_dir(tmp_path):
    folder = write_hf_dataset_dir(tmp_path)
    corpus = load(folder, tmp_path, source_name="hf_dataset")
    expected = load_hf_dataset_dir(folder)
    assert (corpus.train, corpus.test) == (expected.train, expected.test)
    assert load(folder, tmp_path, split={"val": "test"}).val == trl_expected("hf_prefs")


def test_missing_local_path_is_not_looked_up_on_the_hub(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "nope.parquet", tmp_path)


# ----------------------------------------------------------------- TRL formats, detected
def _file(tmp_path: Path, name: str, rows: list) -> Path:
    path = tmp_path / name
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(path)) if name.endswith(".parquet") else ds.to_json(str(path))
    return path


@pytest.mark.parametrize("name", ["prefs.parquet", "prefs.jsonl"])
def test_trl_standard_preference_file(tmp_path, name):
    corpus = load(_file(tmp_path, name, PREF_ROWS), tmp_path, source_name="jsonl")
    assert corpus.train == pref_expected(True) and corpus.dropped == {}


@pytest.mark.parametrize("name", ["conv.parquet", "conv.json"])
def test_trl_conversational_file(tmp_path, name):
    corpus = load(_file(tmp_path, name, TRL_ROWS), tmp_path, source_name="jsonl")
    assert corpus.train == trl_expected()


def test_trl_implicit_prompt_and_sft_formats(tmp_path):
    implicit = [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
        for r in TRL_ROWS
    ]
    corpus = load(_file(tmp_path, "implicit.parquet", implicit), tmp_path, source_name="jsonl")
    assert corpus.train == trl_expected()
    messages = [{"messages": r["prompt"] + r["chosen"]} for r in TRL_ROWS]
    corpus = load(_file(tmp_path, "messages.parquet", messages), tmp_path, source_name="m")
    assert corpus.train == [
        DialogueExample(e.prompt, e.chosen, "unknown", "", "m") for e in trl_expected()
    ]
    completion = [{"prompt": "Hi", "completion": "Hello!"}, {"prompt": "x", "completion": " "}]
    corpus = load(_file(tmp_path, "completion.jsonl", completion), tmp_path, source_name="c")
    assert corpus.train == [DialogueExample(f"{H} Hi{A}", " Hello!", "unknown", "", "c")]
    assert corpus.dropped == {"empty_response": 1}


# ------------------------------------------------------------------ columns and splits
def test_column_mapping_preference_and_dialogue(tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in PREF_ROWS]
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    corpus = load(
        _file(tmp_path, "q.parquet", rows), tmp_path, columns=columns, source_name="jsonl"
    )
    assert corpus.train == pref_expected(False)
    rows = [{"ctx": "How are you?", "reply": "Fine.", "safety": "Safe", "response": "ignored"}]
    columns = {"context": "ctx", "response": "reply", "label": "safety"}
    corpus = load(_file(tmp_path, "d.jsonl", rows), tmp_path, columns=columns, source_name="d")
    assert corpus.train == [DialogueExample(f"{H} How are you?{A}", " Fine.", "safe", "", "d")]


@pytest.mark.parametrize(
    "columns, key, words",
    [
        ({"prompt": "question", "chosen": "gud"}, "data.source.columns.chosen", "'gud'"),
        ({"answer": "good"}, "data.source.columns.answer", "unknown record field"),
    ],
)
def test_bad_column_mapping_names_the_key(tmp_path, columns, key, words):
    rows = [{"question": "q", "good": "a", "bad": "b"}]
    with pytest.raises(ConfigError, match=key) as e:
        load(_file(tmp_path, "q.parquet", rows), tmp_path, columns=columns)
    assert words in str(e.value) and ("'question'" in str(e.value) or "answer" in str(e.value))


def test_split_mapping_slices_and_unknown_splits(tmp_path):
    repo = hh_repo(tmp_path)
    corpus = load(
        repo, tmp_path, data_dir="harmless-base", split={"train": "test[:1]", "val": None}
    )
    assert len(corpus.train) == 1 and corpus.val == corpus.test == []
    with pytest.raises(ConfigError, match=r"data\.source\.split\.dev"):
        load(repo, tmp_path, split={"dev": "test"})
    extra = write_jsonl_file(tmp_path, "extra.jsonl", DIALOGUE_ROWS)
    with pytest.raises(DataError, match=r"unknown split 'extra'.*data\.source\.split"):
        load(tmp_path, tmp_path, data_files={"extra": str(extra)})
    corpus = load(tmp_path, tmp_path, data_files={"extra": str(extra)}, split={"test": "extra"})
    assert len(corpus.test) == 3 and isinstance(corpus.test[0], DialogueExample)


def test_bad_row_names_split_and_row(tmp_path):
    rows = [*PREF_ROWS[:1], {**PREF_ROWS[1], "chosen": None}]
    with pytest.raises(DataError, match=r"train:2: null field 'chosen'"):
        load(_file(tmp_path, "bad.parquet", rows), tmp_path)


# ------------------------------------------------------------------------------ end to end
def test_train_py_data_hf_dpo_on_hub_layout_folder(tmp_path):
    rows = [
        {"chosen": f"{H} Question {i}?{A} Answer {i}.", "rejected": f"{H} Question {i}?{A} No."}
        for i in range(24)
    ]
    repo = hh_repo(tmp_path / "repo", train=rows)
    assert isinstance(load_hh_rlhf(repo / "harmless-base").train[0], PreferenceExample)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [
        sys.executable, "train.py", f"hydra.run.dir={tmp_path}/run", *TINY, "trainer=debug",
        "method=dpo", "data=hf", f"data.source.path={repo}", "data.source.data_dir=harmless-base",
        f"data.source.cache_dir={tmp_path}/hf_cache", "data.batch_size=4",
        f"paths.cache_dir={tmp_path}/cache",
    ]  # fmt: skip
    start = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "train/rewards/accuracies" in metrics, metrics
    assert time.monotonic() - start < 600
