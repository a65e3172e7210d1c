"""method=classifier under DDP (issue 9 item 7): Lightning rebuilds the length-grouped batch
sampler around its DistributedSampler, so each rank gets an equal, disjoint share of the rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_classifier import write_diasafety
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from safealign.data.classify import LengthGroupedBatches

ROOT = Path(__file__).resolve().parents[1]


def _rank_loader(lengths: list[int], rank: int, world: int, shuffle: bool) -> DataLoader:
    """What Lightning's DDP does to a `*_dataloader` hook's loader on `rank` of `world`."""
    from lightning.fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
    from lightning.pytorch.utilities.data import _update_dataloader

    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        batches = LengthGroupedBatches(lengths, batch_size=4, shuffle=shuffle, seed=0, window=3)
        loader = DataLoader(list(range(len(lengths))), batch_sampler=batches)
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=shuffle)
    rebuilt = _update_dataloader(loader, sampler)
    _set_sampler_epoch(rebuilt, 0)
    return rebuilt


@pytest.mark.parametrize("shuffle", [True, False])
def test_each_rank_gets_an_equal_disjoint_share_of_length_grouped_batches(shuffle):
    lengths = [(i * 37) % 101 for i in range(96)]
    loaders = [_rank_loader(lengths, r, 2, shuffle) for r in range(2)]
    shares = [[i for b in loader.batch_sampler for i in b] for loader in loaders]
    assert all(isinstance(lo.batch_sampler, LengthGroupedBatches) for lo in loaders)
    assert len(loaders[0]) == len(loaders[1]) == 12  # 48 rows each, batches of 4
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == list(range(96))
    again = [i for b in _rank_loader(lengths, 0, 2, shuffle).batch_sampler for i in b]
    assert again == shares[0]  # deterministic: the same seed gives the same batches
    for b in loaders[0].batch_sampler:  # still grouped by length within the rank's share
        assert max(lengths[i] for i in b) - min(lengths[i] for i in b) < 60


@pytest.mark.slow
def test_classifier_trains_with_ddp_on_two_processes(tmp_path):
    data = write_diasafety(tmp_path / "dia", n_train=64, n_eval=16)
    run = tmp_path / "run"
    args = ["method=classifier", "model=tiny_encoder", "data=diasafety_cls",
            f"data.source.path={data}", "data.batch_size=8", "strategy=ddp",
            "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false", "logger=csv", f"paths.cache_dir={tmp_path / 'c'}",
            f"paths.artifacts_dir={tmp_path / 'art'}", f"hydra.run.dir={run}"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")  # fmt: skip
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 4  # 64 rows / 2 ranks / batches of 8: each rank trained on half
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/n"] == 16 and "val/acc" in metrics
    assert (run / "model" / "model.safetensors").exists()
