"""Smoke run of bench/preference.py: every row trains, the table and the JSON are complete.

Runs the real benchmark (eight subprocesses: safealign DPO/ADPO through Lightning, shared-prompt
and unshared, TRL DPOTrainer)
on a tiny model for two timed steps. Nothing here looks at wall time: only that each row did the
work it claims and that the rows trained the same model on the same data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "preference.py"
ROWS = ["safealign DPO", "safealign DPO otf", "safealign ADPO", "safealign ADPO otf",
        "safealign DPO unshared", "safealign ADPO unshared", "TRL DPO", "TRL DPO otf"]  # fmt: skip

pytest.importorskip("trl")
pytestmark = pytest.mark.slow  # eight fresh interpreters importing lightning / trl: about a minute


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "preference.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--repeats", "1", "--out", str(out),
         "--rows", *ROWS],
        capture_output=True, text=True, timeout=900, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_table_has_every_row(smoke):
    stdout, _ = smoke
    table = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + len(ROWS)  # header, rule, one line per row
    names = [ln.split("|")[1].strip() for ln in table[2:]]
    assert names == ROWS
    assert sum(ln.startswith(("MET ", "MISS")) for ln in stdout.splitlines()) == 6


def test_rows_did_the_same_work(smoke):
    _, result = smoke
    cfg, rows = result["config"], result["rows"]
    assert sorted(rows) == sorted(ROWS)  # write_json sorts keys
    steps = cfg["steps"]
    for name, r in rows.items():
        assert r["timed_steps"] == steps, name
        assert r["pairs"] == steps * cfg["batch_size"], name
        assert r["tokens"] > 0 and r["pairs_per_s"] > 0 and r["tokens_per_s"] > 0, name
        assert r["peak_rss_mb"] >= r["rss_start_mb"] > 0, name
        assert r["torch_threads"] == cfg["threads"], name
        # the one-time precompute is reported apart, and only where it happens
        assert (r["precompute_s"] is not None) == r["precomputed"], name
    assert len({r["params"] for r in rows.values()}) == 1
    assert len({r["vocab_hash"] for r in rows.values()}) == 1
    # same tokenisation and data: safealign and TRL feed the policy the same number of tokens
    assert len({r["epoch_tokens"] for r in rows.values() if r["method"] == "dpo"}) == 1
    # ADPO's policy forward holds three sequences per pair, DPO's two
    adpo, dpo = rows["safealign ADPO"]["epoch_tokens"], rows["safealign DPO"]["epoch_tokens"]
    assert 1.2 * dpo < adpo < 1.8 * dpo


def test_ratios_follow_from_the_rows(smoke):
    _, result = smoke
    rows, ratios = result["rows"], result["ratios"]
    got = ratios["safealign DPO otf"]["pairs_per_s_vs_trl"]
    assert got == pytest.approx(
        rows["safealign DPO otf"]["pairs_per_s"] / rows["TRL DPO otf"]["pairs_per_s"]
    )
    got = ratios["safealign ADPO"]["step_vs_dpo"]
    assert got == pytest.approx(
        rows["safealign ADPO"]["step_ms_mean"] / rows["safealign DPO"]["step_ms_mean"]
    )
    got = ratios["safealign ADPO unshared"]["step_vs_dpo"]  # unshared ADPO vs unshared DPO
    assert got == pytest.approx(
        rows["safealign ADPO unshared"]["step_ms_mean"]
        / rows["safealign DPO unshared"]["step_ms_mean"]
    )
    assert ratios["TRL DPO"] == {}


@pytest.fixture(scope="module")
def logps_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "logps.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "logps.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_logps_bench_rows_and_ratios(logps_smoke):
    """bench/logps.py: one row per implementation, ratios against today's, same numbers."""
    stdout, result = logps_smoke
    table = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    assert [ln.split("|")[3].strip() for ln in table[2:]] == ["today", "safealign", "TRL"]
    rows = {r["impl"]: r for r in result["rows"]}
    today, lean = rows["today"], rows["safealign"]
    assert lean["fwd_mem_x"] == pytest.approx(lean["fwd_extra_mb"] / today["fwd_extra_mb"])
    assert lean["time_x"] == pytest.approx(
        (lean["fwd_ms"] + lean["bwd_ms"]) / (today["fwd_ms"] + today["bwd_ms"])
    )
    assert lean["max_abs_dlogp"] == 0.0  # bit for bit today's values
    assert all(r["peak_reset"] and r["fwd_ms"] > 0 and r["bwd_ms"] > 0 for r in rows.values())
    assert sum(ln.startswith(("MET ", "MISS")) for ln in stdout.splitlines()) == 1
