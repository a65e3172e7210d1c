"""The data layer's seams: readers -> converters -> Corpus -> prompt rows, and the one-reader +
one-YAML path for a new format (safealign/data/readers.py's docstring)."""

from __future__ import annotations

import json
from functools import partial

import pytest
from fixtures_writers import (
    DIALOGUE_ROWS,
    PREF_ROWS,
    write_dialogues,
    write_json_array,
    write_prefs,
)
from hydra.utils import instantiate

from safealign.data.builtin import BuiltinSpec
from safealign.data.converters import CONVERTERS, convert_rows, converter
from safealign.data.drops import EMPTY_RESPONSE, IDENTICAL_PAIR
from safealign.data.prompts import prompt_rows
from safealign.data.readers import read_csv, read_json_array, read_jsonl, read_lines
from safealign.data.sources import load_jsonl, load_rows
from safealign.errors import ConfigError, DataError
from safealign.eval.eval_sets import builtin_test, corpus_split
from safealign.types import Corpus, DialogueExample, PreferenceExample

H, A = "\n\nHuman:", "\n\nAssistant:"


def test_readers_number_records_by_their_first_line(tmp_path):
    arr = tmp_path / "a.json"
    arr.write_text('[\n  {"a": 1},\n  {"b": [\n 2]},\n  {"c": 3}\n]\n')
    assert list(read_json_array(arr)) == [(2, {"a": 1}), (3, {"b": [2]}), (5, {"c": 3})]
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert list(read_jsonl(jl)) == [(1, {"a": 1}), (3, {"b": 2})]
    txt = tmp_path / "a.txt"
    txt.write_text("one\n\n two\n")
    assert list(read_lines(txt)) == [(1, {"prompt": "one"}), (3, {"prompt": " two"})]
    csv = tmp_path / "a.csv"
    csv.write_text('x,y\n1,"multi\nline"\n2,b\n')
    assert [line for line, _ in read_csv(csv, ("x",))] == [2, 4]
    with pytest.raises(DataError, match=r"a.csv:1: missing CSV column\(s\) \['z'\]"):
        list(read_csv(csv, ("z",)))


def test_drop_policy_is_counted_once_per_reason(tmp_path):
    rows = [
        (1, {"prompt": "p", "chosen": "a", "rejected": " a "}),
        (2, {"prompt": "p", "chosen": "a", "rejected": " "}),
        (3, {"prompt": "p", "chosen": "a", "rejected": "b"}),
    ]
    records, dropped = convert_rows(tmp_path, rows, "x")
    assert dropped == {IDENTICAL_PAIR: 1, EMPTY_RESPONSE: 1} and len(records) == 1
    with pytest.raises(ConfigError, match="data.source.row_format"):
        converter("nope")
    assert converter("dialogue") is CONVERTERS["dialogue"] and converter(None) is None


def test_load_rows_is_load_jsonl_with_any_reader(tmp_path):
    as_jsonl = load_jsonl(write_prefs(tmp_path))
    as_json = load_rows(write_json_array(tmp_path / "prefs.json", PREF_ROWS), read_json_array)
    assert as_json.train == [
        PreferenceExample(r.prompt, r.chosen, r.rejected, r.toxic, "prefs") for r in as_jsonl.train
    ]
    renamed = [{"utterance": r["context"], **{k: v for k, v in r.items() if k != "context"}}
               for r in DIALOGUE_ROWS]  # fmt: skip
    path = write_json_array(tmp_path / "renamed.json", renamed)
    corpus = load_rows(path, read_json_array, "test", columns={"context": "utterance"})
    expected = load_jsonl(write_dialogues(tmp_path), split="test")
    assert [(r.context, r.response, r.label) for r in corpus.test] == [
        (r.context, r.response, r.label) for r in expected.test
    ] and corpus.dropped == expected.dropped
    with pytest.raises(ConfigError, match="data.source.columns"):
        load_rows(path, read_json_array, columns={"utterance": "context"})


def test_json_preset_is_one_reader_and_one_yaml(make_cfg, tmp_path):
    path = write_json_array(tmp_path / "prefs.json", PREF_ROWS)
    cfg = make_cfg("data=json", f"data.source.path={path}")
    assert instantiate(cfg.data.source)() == load_rows(path, read_json_array)


def test_prompt_rows_one_shape_for_every_corpus():
    d = DialogueExample(f"{H} q{A}", " r", "unsafe", "t", "s")
    p = PreferenceExample(f"{H} q{A}", " good", " bad", None, "s")
    corpus = Corpus(train=[d], test=[p], name="c")
    assert prompt_rows(corpus, "train") == [
        {"prompt": d.context, "reference": " r", "reference_label": "unsafe", "topic": "t"}
    ]
    assert prompt_rows(corpus, "test") == [{"prompt": p.prompt, "reference": " good"}]
    assert corpus_split(corpus, "train") == prompt_rows(corpus, "train")
    spec = BuiltinSpec(size=200)
    assert builtin_test(size=200) == corpus_split(spec.dialogues) == corpus_split(spec.dialogues())
    with pytest.raises(DataError, match="no prompts"):
        corpus_split(corpus, "val")


def test_data_split_eval_set_reads_a_data_source(tmp_path):
    from test_evaluate import compose_eval

    rows = [{**r, "context": f"c{i}"} for i, r in enumerate(DIALOGUE_ROWS)]
    path = write_json_array(tmp_path / "d.json", rows)
    cfg = compose_eval(["eval_set=data_split", f"eval_set.source.path={path}", "models.sft=x"],
                       tmp_path)  # fmt: skip
    got = instantiate(cfg.eval_set)
    source = partial(load_rows, path, read_json_array, "test")
    assert got == corpus_split(source) and json.loads(json.dumps(got)) == got
