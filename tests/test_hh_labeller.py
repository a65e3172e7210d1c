"""HH-RLHF [TOXIC] labelling (issue 11 item 6; docs/methods.md A.1): both transcripts of every
pair become SFT dialogues, a scorer + threshold on the final assistant turn marks unsafe ones, the
one-split source is split context-disjointly, and experiment=adpo_hh composes."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from safealign.data.labeller import (
    DUPLICATE_DIALOGUE,
    Labeller,
    label_counts,
    labelled_dialogues,
)
from safealign.data.sources import load_hh_rlhf
from safealign.errors import ConfigError
from safealign.types import SAFE, UNKNOWN, UNSAFE, DialogueExample
from safealign.utils import check_required
from safealign.validate import validate_config

H, A = "\n\nHuman:", "\n\nAssistant:"
# (prompt, chosen reply, rejected reply). "BAD" scores 1.0 and "MEH" 0.5 (= the threshold, so
# marked: >=); the word "BAD" in an EARLIER turn of the context must not mark a dialogue.
PAIRS = [
    (f"{H} Hi{A}", " Hello there.", " BAD words here."),
    (f"{H} Say BAD{A} No.{H} Please?{A}", " Still no.", " Fine, MEH."),
    (f"{H} Help me{A}", " MEH, maybe.", " Sure, gladly."),
    (f"{H} Hi{A}", " Hello there.", " BAD words here."),  # duplicate pair: 2 duplicate dialogues
    (f"{H} Weather?{A}", " Sunny.", " Rainy."),
]


class KeywordScorer:
    """Deterministic fake toxicity scorer on the response only: BAD -> 1.0, MEH -> 0.5, else 0.1."""

    name = "keyword"

    def __init__(self, nan_word: str | None = None) -> None:
        self.nan_word = nan_word
        self.contexts: list[list[str]] = []  # what each score() call was given

    def score(self, responses: list[str], contexts: list[str] | None = None) -> np.ndarray:
        self.contexts.append(list(contexts or []))
        table = [(self.nan_word, float("nan")), ("BAD", 1.0), ("MEH", 0.5)]
        return np.array([next((s for w, s in table if w and w in r), 0.1) for r in responses])


def write_hh_gz(directory: Path, pairs=PAIRS, name: str = "test.jsonl.gz") -> Path:
    """The real harmless-base format: gzipped JSONL rows of two whole transcripts."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for p, c, r in pairs:
            f.write(json.dumps({"chosen": p + c, "rejected": p + r}) + "\n")
    return path


def loader(path: Path):
    return lambda: load_hh_rlhf(path)


def test_both_transcripts_are_read_and_deduplicated(tmp_path):
    path = write_hh_gz(tmp_path)
    corpus = labelled_dialogues(loader(path), None, test_fraction=0.0, val_fraction=0.0)
    expected = {(p, c) for p, c, _ in PAIRS} | {(p, r) for p, _, r in PAIRS}
    assert {(d.context, d.response) for d in corpus.train} == expected  # 8 distinct of 10
    assert len(corpus.train) == 8 and corpus.dropped == {DUPLICATE_DIALOGUE: 2}
    assert {d.label for d in corpus.train} == {UNKNOWN}  # no labeller: nothing marked
    sides = [d.meta["transcript"] for d in corpus.train]
    assert sides.count("chosen") == 4 and sides.count("rejected") == 4


def test_labeller_marks_exactly_the_rows_at_or_above_threshold(tmp_path, caplog):
    scorer = KeywordScorer()
    corpus = labelled_dialogues(
        loader(write_hh_gz(tmp_path)), Labeller(scorer, 0.5), test_fraction=0.0, val_fraction=0.0
    )
    unsafe = {(d.context, d.response) for d in corpus.train if d.label == UNSAFE}
    # by hand: " BAD words here." (1.0), " Fine, MEH." and " MEH, maybe." (0.5 >= 0.5)
    assert unsafe == {
        (PAIRS[0][0], PAIRS[0][2]),
        (PAIRS[1][0], PAIRS[1][2]),
        (PAIRS[2][0], PAIRS[2][1]),
    }
    assert {d.label for d in corpus.train if (d.context, d.response) not in unsafe} == {SAFE}
    # the final assistant turn is scored in its context (the context's "BAD" does not count)
    assert sorted(scorer.contexts[0]) == sorted(d.context for d in corpus.train)
    assert label_counts(corpus) == {
        "dialogues": 8,
        "unsafe_from_chosen": 1,
        "unsafe_from_rejected": 2,
    }
    with caplog.at_level(logging.INFO, logger="safealign.data.labeller"):
        labelled_dialogues(
            loader(tmp_path / "test.jsonl.gz"), Labeller(KeywordScorer(), 0.6), 0.0, 0.0
        )
    assert "5 pairs -> 8 dialogues (2 duplicates dropped)" in caplog.text
    assert "labelled unsafe (keyword >= 0.6): 0 from chosen, 1 from rejected" in caplog.text


def test_unscorable_dialogues_stay_unknown(tmp_path):
    corpus = labelled_dialogues(
        loader(write_hh_gz(tmp_path)), Labeller(KeywordScorer(nan_word="Sunny"), 0.5), 0.0, 0.0
    )
    labels = {d.response: d.label for d in corpus.train}
    assert labels[" Sunny."] == UNKNOWN and labels[" Rainy."] == SAFE


def test_one_split_source_is_split_context_disjointly(tmp_path):
    pairs = [(f"{H} Question {i}?{A}", f" Answer {i}.", f" No {i}.") for i in range(40)]
    path = write_hh_gz(tmp_path, pairs)
    corpus = labelled_dialogues(loader(path), None, test_fraction=0.25, val_fraction=0.1, seed=3)
    contexts = {s: {d.context for d in getattr(corpus, s)} for s in ("train", "val", "test")}
    assert (len(contexts["train"]), len(contexts["val"]), len(contexts["test"])) == (27, 3, 10)
    assert not (contexts["train"] & contexts["test"]) and not (contexts["train"] & contexts["val"])
    assert all(len(getattr(corpus, s)) == 2 * len(contexts[s]) for s in contexts)  # both sides
    again = labelled_dialogues(loader(path), None, test_fraction=0.25, val_fraction=0.1, seed=3)
    other = labelled_dialogues(loader(path), None, test_fraction=0.25, val_fraction=0.1, seed=4)
    assert again.test == corpus.test and other.test != corpus.test


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"scorer": object(), "threshold": 0.5}, "data.source.labeller.scorer"),
        ({"scorer": KeywordScorer(), "threshold": "high"}, "data.source.labeller.threshold"),
        ({"scorer": KeywordScorer(), "threshold": float("nan")}, "data.source.labeller.threshold"),
    ],
)
def test_bad_labeller_config_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Labeller(**kwargs)


def test_bad_source_config_names_the_key(tmp_path):
    path = write_hh_gz(tmp_path)
    with pytest.raises(ConfigError, match=r"data\.source\.test_fraction"):
        labelled_dialogues(loader(path), None, test_fraction=1.5)
    with pytest.raises(ConfigError, match=r"data\.source\.pairs"):
        labelled_dialogues(lambda: load_hh_rlhf(path, as_dialogues=True))


def hh_overrides(data: Path, *extra: str) -> list[str]:
    scorer = "init.data.source.labeller.scorer"
    return [
        "experiment=adpo_hh",
        f"paths.data_dir={data}",
        f"{scorer}._target_=test_hh_labeller.KeywordScorer",
        *extra,
    ]


def test_adpo_hh_composes_validates_and_marks_toxic(make_cfg, tmp_path):
    write_hh_gz(tmp_path / "data" / "hh_rlhf_harmless_base")
    cfg = make_cfg(*hh_overrides(tmp_path / "data", "init.data.source.test_fraction=0.2"))
    check_required(cfg)
    validate_config(cfg)
    assert cfg.init.data.toxic_control and cfg.init.data.source.labeller.threshold == 0.5
    dm = instantiate(cfg.init.data)
    assert isinstance(dm.corpus.train[0], DialogueExample) and dm.corpus.test  # eval prompts
    tokenizer = instantiate(cfg.model.tokenizer)(texts=dm.texts())
    dm.attach(tokenizer, DialogueExample)
    marked = sum(d.label == UNSAFE for s in ("train", "val", "test") for d in getattr(dm.corpus, s))
    assert marked == 3 and dm.stats["with_control_token"] == marked  # [TOXIC] reaches SFT


def test_adpo_hh_hub_preset_is_one_override(make_cfg, tmp_path):
    """data@init.data=hh_rlhf_hub_sft swaps the pair loader only; on a Hub-shaped folder its
    train/test splits are used as given (val held out of train by prompt) and labelled alike."""
    repo = tmp_path / "Anthropic" / "hh-rlhf"
    write_hh_gz(repo / "harmless-base", PAIRS[:3], "train.jsonl.gz")
    write_hh_gz(repo / "harmless-base", PAIRS[4:], "test.jsonl.gz")
    cfg = make_cfg(
        *hh_overrides(tmp_path, "data@init.data=hh_rlhf_hub_sft"),
        f"init.data.source.pairs.path={repo}",
        f"+init.data.source.pairs.cache_dir={tmp_path}/hf_cache",
    )
    pairs = cfg.init.data.source.pairs
    assert (
        pairs._target_ == "safealign.data.hub.load_hf_dataset" and pairs.data_dir == "harmless-base"
    )
    assert cfg.init.data.source.labeller.threshold == 0.5 and cfg.init.data.toxic_control
    validate_config(cfg)
    corpus = instantiate(cfg.init.data.source)()
    assert {d.context for d in corpus.test} == {PAIRS[4][0]} and len(corpus.test) == 2
    assert label_counts(corpus) == {
        "dialogues": 8,
        "unsafe_from_chosen": 1,
        "unsafe_from_rejected": 2,
    }


def test_misspelt_labeller_key_fails_naming_it(make_cfg, tmp_path):
    write_hh_gz(tmp_path / "data" / "hh_rlhf_harmless_base")
    cfg = make_cfg(*hh_overrides(tmp_path / "data", "+init.data.source.labeller.treshold=0.3"))
    with pytest.raises(InstantiationException, match="treshold"):
        instantiate(cfg.init.data)
