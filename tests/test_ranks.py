"""The one rank helper (issue 9 item 3): torchrun, SLURM (srun/submitit), Lightning children, MPI."""

from __future__ import annotations

import pytest

from safealign import ranks
from safealign.pipeline.store import ArtifactStore
from safealign.utils import rank_zero

_KEYS = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_PROCID",
         "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_NNODES", "SLURM_JOB_ID",
         "SLURM_STEP_ID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "JSM_NAMESPACE_RANK",
         "TORCHELASTIC_RUN_ID", "MASTER_PORT", "MASTER_ADDR", "NUM_NODES")  # fmt: skip


@pytest.fixture
def env(monkeypatch):
    for k in _KEYS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("vars_", "rank", "local", "world"),
    [
        ({}, 0, 0, 1),
        ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, 3, 1, 4),  # torchrun
        ({"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4"}, 1, 1, 4),  # srun
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, 1, 1, 2),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, 0, 0, 1),  # sbatch, one task
        ({"LOCAL_RANK": "1", "NODE_RANK": "1", "WORLD_SIZE": "4", "NUM_NODES": "2"}, 3, 1, 4),
        ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3"}, 2, 0, 3),
    ],
)
def test_rank_sources(env, vars_, rank, local, world):
    for k, v in vars_.items():
        env.setenv(k, v)
    assert (ranks.global_rank(), ranks.local_rank(), ranks.world_size()) == (rank, local, world)
    assert rank_zero() == (rank == 0)


def test_slurm_procid_1_never_commits_a_stage(env, tmp_path):
    """A 2-task srun job: task 1 computes in the shared work dir but leaves the commit to task 0."""
    env.setenv("SLURM_PROCID", "1")
    env.setenv("SLURM_NTASKS", "2")
    env.setenv("SLURM_JOB_ID", "77")
    assert not rank_zero() and ranks.job_id().startswith("slurm-77")
    store = ArtifactStore(tmp_path)
    with pytest.raises(TimeoutError):
        store.get_or_compute("sft", {"a": 1}, lambda p: None, wait_timeout_s=0.5)
    assert not any((tmp_path / "sft").glob("*/DONE.json"))
