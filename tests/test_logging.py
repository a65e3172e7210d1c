"""What a run prints (issue 13): one terminal handler showing stage lines, progress bars and
results; library INFO chatter, tips and deprecation warnings only in the run's log file, once."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safealign.utils import TerminalFilter, adopt_library_loggers, terminal_handler

ROOT = Path(__file__).resolve().parents[1]


def _record(name: str, level: int = logging.INFO, msg: str = "m") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_terminal_shows_stage_lines_results_own_warnings_and_every_error():
    f = TerminalFilter()
    assert f.filter(_record("safealign.pipeline.stages"))  # stage lines
    assert f.filter(_record("safealign.run"))  # results
    assert f.filter(_record("safealign.data.datamodule", logging.WARNING))
    assert f.filter(_record("lightning.pytorch", logging.ERROR))
    assert not f.filter(_record("safealign.data.datamodule"))  # data statistics: log file
    assert not f.filter(_record("safealign.pipeline"))  # the store's own cache lines: log file
    assert not f.filter(_record("safealign.runs"))  # a name prefix is not a child logger
    assert not f.filter(_record("lightning.pytorch.utilities.rank_zero"))  # tips
    assert not f.filter(_record("py.warnings", logging.WARNING))  # deprecation warnings


def test_other_ranks_show_only_their_errors(monkeypatch):
    monkeypatch.setattr("safealign.utils.rank_zero", lambda: False)
    f = TerminalFilter()
    assert not f.filter(_record("safealign.pipeline.stages"))  # rank zero reports the stage
    assert not f.filter(_record("safealign.run", logging.WARNING))
    assert f.filter(_record("safealign.run", logging.ERROR))


def test_warnings_on_the_terminal_say_what_they_are():
    h = terminal_handler()
    assert h.format(_record("safealign.run", msg="stage sft reused")) == "stage sft reused"
    assert h.format(_record("safealign.x", logging.WARNING, "odd")) == "warning: odd"


def test_library_handlers_are_adopted_by_the_run_handlers(monkeypatch):
    own = logging.StreamHandler()
    lightning = logging.getLogger("lightning")
    monkeypatch.setattr(lightning, "handlers", [own])
    monkeypatch.setattr(lightning, "propagate", False)
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.NullHandler()])
    monkeypatch.setattr(logging.getLogger("DeepSpeed"), "filters", [])
    adopt_library_loggers()
    assert lightning.handlers == [] and lightning.propagate
    assert logging.getLogger("DeepSpeed").filters  # its later stdout handler never sees a record


@pytest.mark.slow
def test_a_run_prints_each_line_once_and_chatter_only_to_its_log_file(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "train.py", "experiment=sft_builtin", "trainer=debug", "eval=none",
           f"hydra.run.dir={tmp_path}/run", f"paths.cache_dir={tmp_path}/cache"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    screen = r.stdout + r.stderr
    log = (tmp_path / "run" / "train.log").read_text()
    assert "=== SFTModule finished ===" in r.stdout and "train/loss" in r.stdout  # results
    for chatter in ("GPU available", "Tip:", "Seed set to", "data: truncated", "deprecated"):
        assert chatter not in screen, chatter
    for chatter in ("GPU available", "Seed set to", "data: truncated"):
        assert log.count(chatter) == 1, chatter
    assert "INFO:" not in r.stderr  # Lightning's own handler no longer repeats every line


def test_minilm_load_prints_nothing_under_offline_wandb():
    """transformers' W&B integration print()s a line at import under WANDB_MODE=offline (what
    `make` exports); loading MiniLM sends it to the log, so the demo screen stays clean."""
    code = "from safealign.models.encoder import load_minilm_sentence_model as f; f('cpu')"
    env = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == ""
