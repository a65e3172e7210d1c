"""data.control_recall (issue 11 item 5): only a seeded share of unsafe dialogues gets `[TOXIC]`;
the choice is per dialogue, the same for every batch size and row order, and bad values fail
naming the key before any model is built."""

from __future__ import annotations

import io
import logging
import random

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from safealign.data.control import TOXIC, is_marked
from safealign.data.datamodule import DataModule
from safealign.errors import ConfigError
from safealign.models import add_control_token, train_bpe_tokenizer
from safealign.types import SAFE, UNSAFE, Corpus, DialogueExample, chat_prompt
from safealign.utils import TerminalFilter, TerminalHandler, terminal_quiet

N_UNSAFE = 400


def _rows() -> list[DialogueExample]:
    unsafe = [
        DialogueExample(chat_prompt([f"question {i}?"]), f" shut up, idiot number {i}.", UNSAFE)
        for i in range(N_UNSAFE)
    ]
    safe = [DialogueExample(chat_prompt([f"question {i}?"]), " a kind answer.", SAFE) for i in range(50)]
    return unsafe + safe


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [t for r in _rows() for t in (r.context, r.response)]
    tok = train_bpe_tokenizer(texts, vocab_size=300, cache_dir=str(tmp_path_factory.mktemp("tok")))
    add_control_token(tok)
    return tok


def _marked(tokenizer, recall: float, *, seed: int = 0, batch_size: int = 16, shuffle_rows=False):
    """(context, response) of every train row whose batch carries `[TOXIC]`, and the module."""
    rows = _rows()
    if shuffle_rows:
        random.Random(1).shuffle(rows)
    dm = DataModule(
        Corpus(train=rows, name="t"), batch_size=batch_size, toxic_control=True,
        control_recall=recall, seed=seed,
    )  # fmt: skip
    dm.attach(tokenizer, DialogueExample)
    tid = tokenizer.convert_tokens_to_ids(TOXIC)
    out = set()
    for batch in dm.train_dataloader():
        for i, ids in zip(batch["index"].tolist(), batch["input_ids"].tolist(), strict=True):
            if tid in ids:
                r = dm.corpus.train[i]
                assert r.label == UNSAFE  # safe dialogues never get the token
                out.add((r.context, r.response))
    return out, dm


def test_recall_zero_marks_none_and_one_marks_all(tokenizer):
    none, dm0 = _marked(tokenizer, 0.0)
    assert none == set()
    assert dm0.stats["unsafe_left_unmarked"] == N_UNSAFE and dm0.stats["with_control_token"] == 0
    every, dm1 = _marked(tokenizer, 1.0)
    assert len(every) == N_UNSAFE
    assert dm1.stats["with_control_token"] == N_UNSAFE and dm1.stats["unsafe_left_unmarked"] == 0


def test_half_marks_about_half_the_same_ones_in_any_order_and_batch_size(tokenizer):
    a, dm = _marked(tokenizer, 0.5, batch_size=16)
    # Binomial(400, 0.5): sd 10, so [160, 240] is a 4-sd band
    assert 160 <= len(a) <= 240
    assert dm.stats["with_control_token"] + dm.stats["unsafe_left_unmarked"] == N_UNSAFE
    b, _ = _marked(tokenizer, 0.5, batch_size=7, shuffle_rows=True)
    assert a == b
    c, _ = _marked(tokenizer, 0.5, seed=1)  # seeded: another seed, another draw
    assert c != a and 160 <= len(c) <= 240


def test_lower_recall_marks_a_subset():
    # the draw is compared with the recall: raising it only adds dialogues
    rows = _rows()[:N_UNSAFE]
    low = {r for r in rows if is_marked(r.context, r.response, 0.3, 0)}
    high = {r for r in rows if is_marked(r.context, r.response, 0.6, 0)}
    assert low < high


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5", None])
def test_invalid_recall_names_the_key(bad):
    with pytest.raises(ConfigError, match="data.control_recall"):
        DataModule(Corpus(train=_rows(), name="t"), toxic_control=True, control_recall=bad)


def test_config_value_fails_at_data_instantiation_before_any_model(make_cfg):
    cfg = make_cfg("data.source.size=100", "data.control_recall=2.0")
    # safealign.fit.build instantiates the data first; Hydra wraps the ConfigError
    with pytest.raises(InstantiationException, match=r"data\.control_recall.*got 2\.0"):
        instantiate(cfg.data)


# --- the demo's clean screen (issue 11 item 5): while a stage computes, only its status line ---


def _record(name: str, level: int = logging.INFO, msg: str = "m", **extra) -> logging.LogRecord:
    r = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    r.__dict__.update(extra)
    return r


def test_inside_a_stage_the_terminal_shows_stage_lines_and_errors_and_counts_warnings():
    f = TerminalFilter()
    assert f.filter(_record("safealign.run"))  # a plain run's result: shown
    with terminal_quiet() as quiet:
        assert f.filter(_record("safealign.pipeline.stages"))
        assert f.filter(_record("safealign.run", logging.ERROR))
        assert not f.filter(_record("safealign.run"))  # the stage's training summary: log file
        assert not f.filter(_record("safealign.eval", logging.WARNING))
    assert quiet["warnings"] == 1
    assert f.filter(_record("safealign.run"))  # closed: as before


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_the_progress_line_is_replaced_on_a_tty_and_kept_elsewhere(tty):
    stream = _Stream(tty)
    h = TerminalHandler(stream)
    h.emit(_record("safealign.pipeline.stages", msg="stage sft running", transient=True))
    h.emit(_record("safealign.pipeline.stages", msg="stage sft computed"))
    expected = "stage sft running\r\x1b[Kstage sft computed\n" if tty else (
        "stage sft running\nstage sft computed\n"
    )
    assert stream.getvalue() == expected
