"""scripts/gpu_check.sh: the dry run composes every cell; the verdicts fail what they must.

The GPU run itself is not exercised here (no GPU); its table and verdict logic are, on synthetic
run dirs: a 0-element tensor in model.safetensors or a step-0 KL of 0.5 must fail the cell.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from safealign.models import build_tiny_llama, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
FSDP2 = ROOT / "conf" / "strategy" / "fsdp2.yaml"
TEXTS = ["\n\nHuman: how do I water a fern?\n\nAssistant: Keep the soil moist."] * 30


sys.path.insert(0, str(ROOT / "scripts"))  # as `python scripts/gpu_check.py` sees it
import gpu_check as gc  # noqa: E402
import gpu_check_verdicts as gv  # noqa: E402


def test_dry_run_composes_every_cell():
    strategies = [s for s in gc.STRATEGIES if s != "fsdp2" or FSDP2.exists()]
    out = subprocess.run(
        [str(SCRIPT), "--dry-run", "--strategies", ",".join(strategies)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    n = len(strategies) * len(gc.METHODS)
    assert f"{n}/{n} cells compose" in out.stdout
    for s in strategies:
        for m in gc.METHODS:
            assert f"{s}/{m}: composes" in out.stdout
    assert "safealign.monitor.ThroughputMonitor" in out.stdout  # the appended callback
    if "fsdp2" not in strategies:
        pytest.skip("conf/strategy/fsdp2.yaml is absent: the fsdp2 cells were not composed")


def test_dry_run_reports_a_missing_strategy_as_a_failure(tmp_path, capsys):
    cells = [gv.Cell("nosuch", "sft")]
    assert gc.dry_run(cells, gc.Plan(tmp_path, devices=1)) == 1
    out = capsys.readouterr().out
    assert "nosuch/sft: FAIL" in out and "strategy/nosuch" in out and "0/1 cells compose" in out


def test_dpo_cells_start_from_the_sft_export_of_the_same_strategy(tmp_path):
    plan = gc.Plan(tmp_path, devices=2)
    ov = gc.base_overrides(gv.Cell("fsdp", "dpo"), plan)
    assert "~init" in ov and "model=hf" in ov
    assert f"model.name_or_path={tmp_path / 'fsdp' / 'sft' / 'model'}" in ov
    assert "trainer.devices=2" in ov and "strategy=fsdp" in ov
    assert "model=tiny_llama" in gc.base_overrides(gv.Cell("fsdp", "sft"), plan)


def test_hydra_literal_keeps_interpolations():
    text = gc.hydra_literal([{"_target_": "a.B", "dirpath": "${paths.output_dir}/c", "n": 5}])
    assert text == '[{_target_:"a.B",dirpath:"${paths.output_dir}/c",n:5}]'
    assert gc.hydra_literal({"x": None, "y": True, "z": 1.5}) == "{x:null,y:true,z:1.5}"


def test_select_cells_orders_sft_first_and_cells_win():
    cells = gc.select_cells(["fsdp2"], ["adpo", "sft"], [])
    assert [c.name for c in cells] == ["fsdp2/sft", "fsdp2/adpo"]
    assert [c.name for c in gc.select_cells(["ddp"], ["sft"], ["fsdp/dpo"])] == ["fsdp/dpo"]


# --- verdicts on synthetic run dirs -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    tok = train_bpe_tokenizer(TEXTS, vocab_size=280)
    model = build_tiny_llama(tok, hidden_size=32, intermediate_size=64, max_position_embeddings=64)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return tok, model, shapes


def _run_dir(path: Path, tiny, kl: float = 0.0, empty: str | None = None) -> Path:
    tok, model, _ = tiny
    (path / "model").mkdir(parents=True)
    model.save_pretrained(path / "model", safe_serialization=True)
    tok.save_pretrained(path / "model")
    if empty:  # what a rank-0 save of a ZeRO-3 partitioned parameter writes
        from safetensors.torch import load_file, save_file

        f = path / "model" / "model.safetensors"
        tensors = load_file(f)
        tensors[empty] = torch.empty(0)
        save_file(tensors, f, metadata={"format": "pt"})
    rows = [
        {"step": 1.0, "train/kl/chosen_step": kl, "train/kl/rejected_step": -kl / 2,
         "train/loss_step": 0.6931},
        {"step": 2.0, "train/kl/chosen_step": 0.3, "train/kl/rejected_step": 0.1,
         "train/loss_step": 0.52},
    ]  # fmt: skip
    (path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    perf = {"perf/tokens_per_s": 12345.6, "perf/peak_mem_gb": 1.25}
    (path / "metrics.json").write_text(json.dumps(perf))
    return path


def _judge(method: str, run_dir: Path, tiny, code: int | None = 0):
    return gv.judge(gv.Cell("ddp", method), run_dir, code, expected_fn=lambda _: tiny[2])


def test_a_good_cell_passes_and_fills_the_row(tmp_path, tiny):
    row = _judge("dpo", _run_dir(tmp_path, tiny, kl=1e-6), tiny)
    assert row.ok, row.problems
    assert row.kl == pytest.approx(1e-6) and row.loss == pytest.approx(0.52)
    assert (row.export, row.tokens_per_s, row.peak_mem_gb) == ("ok", 12345.6, 1.25)
    line = gv.table([row]).splitlines()[-1]
    assert line == "| ddp | dpo | 1.0e-06 | 0.5200 | ok | 12,346 | 1.250 | ok |"


def test_step0_kl_of_half_fails(tmp_path, tiny):
    row = _judge("adpo", _run_dir(tmp_path, tiny, kl=0.5), tiny)
    assert not row.ok and row.kl == pytest.approx(0.5)
    assert any("step-0 |KL| 0.5 > 0.01" in p for p in row.problems)
    assert "FAIL: step-0 |KL|" in gv.table([row])


def test_sft_ignores_kl(tmp_path, tiny):
    row = _judge("sft", _run_dir(tmp_path, tiny, kl=0.5), tiny)
    assert row.ok and row.kl is None
    assert "| n/a |" in gv.table([row])


def test_zero_element_tensor_in_export_fails(tmp_path, tiny):
    name = "model.layers.0.self_attn.q_proj.weight"
    row = _judge("sft", _run_dir(tmp_path, tiny, empty=name), tiny)
    assert not row.ok and row.export == "FAIL"
    assert any("0-element tensors" in p and name in p for p in row.problems)


def test_export_shapes_must_match_a_fresh_model(tmp_path, tiny):
    run = _run_dir(tmp_path, tiny)
    wrong = dict(tiny[2], **{"lm_head.weight": (7, 7)})
    row = gv.judge(gv.Cell("fsdp2", "sft"), run, 0, expected_fn=lambda _: wrong)
    assert any("shapes differ" in p and "lm_head.weight" in p for p in row.problems)


def test_nonzero_exit_timeout_and_missing_outputs_fail(tmp_path, tiny):
    run = _run_dir(tmp_path / "a", tiny)
    assert "exit status 1" in _judge("sft", run, tiny, code=1).problems
    assert "timed out" in _judge("sft", run, tiny, code=None).problems
    empty = _judge("dpo", tmp_path / "nothing", tiny)
    assert not empty.ok and "no history.jsonl rows" in empty.problems


def test_expected_shapes_come_from_the_model_config(tmp_path, tiny):
    tok, _, _ = tiny
    tok.save_pretrained(tmp_path)
    shapes = gv.expected_shapes(tmp_path)
    assert shapes["model.embed_tokens.weight"] == (len(tok), 128)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (64, 128)  # 2 KV heads x 32


# --- model=tiny_llama -------------------------------------------------------------------------


def test_tiny_llama_trains_and_round_trips(tmp_path, tiny):
    from safealign.models import load_causal_lm, load_tokenizer

    tok, _, _ = tiny
    model = build_tiny_llama(tok, hidden_size=32, intermediate_size=64, max_position_embeddings=64)
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == len(tok)
    ids = torch.randint(0, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in model.parameters())
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    loaded = load_causal_lm(load_tokenizer(str(tmp_path)), str(tmp_path))
    assert type(loaded).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)


def test_tiny_llama_is_seeded_and_leaves_the_global_rng_alone(tiny):
    tok = tiny[0]
    state = torch.random.get_rng_state()
    a, b = build_tiny_llama(tok, seed=3), build_tiny_llama(tok, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(a.state_dict(), b.state_dict())
    assert not torch.equal(a.lm_head.weight, build_tiny_llama(tok, seed=4).lm_head.weight)


@pytest.mark.slow
def test_train_sft_with_tiny_llama(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable, str(ROOT / "train.py"), "experiment=sft_builtin", "model=tiny_llama",
        "trainer.max_steps=3", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}",
        f"paths.cache_dir={tmp_path / 'cache'}", f"paths.artifacts_dir={tmp_path / 'art'}",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = gv.read_jsonl(run / "history.jsonl")
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["train/loss_step"])) for r in rows)
    assert gv.check_export(run / "model", gv.expected_shapes(run / "model")) == []


# --- ThroughputMonitor ------------------------------------------------------------------------


def test_count_tokens_sums_every_attention_mask():
    from safealign.monitor import count_tokens

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert count_tokens({"input_ids": torch.zeros(2, 4), "attention_mask": mask}) == 5
    batch = {"attention_mask": mask, "toxic_ctx_attention_mask": torch.ones(1, 3)}
    assert count_tokens(batch) == 8
    assert count_tokens({"input_ids": torch.zeros(2, 4, dtype=torch.long)}) == 8
    assert count_tokens([mask]) == 0


def test_throughput_monitor_logs_into_callback_metrics(tmp_path):
    import lightning.pytorch as L
    from torch.utils.data import DataLoader

    from safealign.monitor import ThroughputMonitor

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch["x"]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    mask = torch.tensor([1, 1, 1, 0])  # 3 real tokens per example, 2 examples per batch
    data = [{"x": torch.randn(4), "attention_mask": mask} for _ in range(8)]
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[monitor := ThroughputMonitor(skip_steps=1)],
    )  # fmt: skip
    trainer.fit(Tiny(), DataLoader(data, batch_size=2))
    m = trainer.callback_metrics
    assert {"perf/tokens_per_s", "perf/step_time_s", "perf/peak_mem_gb"} <= set(m)
    assert [t for t, _ in monitor._steps] == [6.0] * 4  # non-pad tokens of each batch
    seconds = sum(s for _, s in monitor._steps[1:])  # the first step is skipped
    assert float(m["perf/tokens_per_s"]) == pytest.approx(18.0 / seconds, rel=1e-5)
    assert float(m["perf/step_time_s"]) == pytest.approx(seconds / 3, rel=1e-5)
    assert 0.01 < float(m["perf/peak_mem_gb"]) < 64  # peak RSS of this process on CPU


def test_a_timed_out_cell_leaves_no_process_behind():
    # a parent that exits while its child (a "rank") hangs on: the whole group must go
    proc = subprocess.Popen(["bash", "-c", "sleep 300 & wait"], start_new_session=True)
    gc._stop_group(proc)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _live_in_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _live_in_group(proc.pid)


def _live_in_group(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (a killed orphan stays a zombie until
    whatever adopted it reaps it, and signal 0 still "reaches" a zombie)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # state, ppid, pgrp
            live.append(int(stat.parent.name))
    return live
