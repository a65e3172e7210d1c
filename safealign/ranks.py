"""Which process am I? One answer for torchrun, SLURM (srun / submitit), Lightning and MPI.

Every rank-0-only action (artefact-store commits, fingerprints, summaries, exports) asks here.
Order of evidence (issue 9 item 3):

1. an initialised ``torch.distributed`` process group: the truth once it exists;
2. ``RANK`` (torchrun, Lightning's DDP children, DeepSpeed launcher);
3. ``NODE_RANK`` + ``LOCAL_RANK`` (Lightning's popen children set these before the group);
4. ``SLURM_PROCID`` when SLURM runs several tasks (``SLURM_NTASKS`` > 1): srun and submitit set no
   ``RANK``, so reading only ``RANK``/``LOCAL_RANK`` made every task of a 4-GPU job "rank 0";
5. ``OMPI_COMM_WORLD_RANK`` / ``PMI_RANK`` (mpirun), ``JSM_NAMESPACE_RANK`` (LSF).

Otherwise the process is alone: rank 0 of 1.
"""

from __future__ import annotations

import os
import sys


def _dist_group():
    dist = sys.modules.get("torch.distributed")  # never import torch just to ask
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


def _slurm_multi_task() -> bool:
    return int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1")) or 1) > 1


def global_rank() -> int:
    dist = _dist_group()
    if dist is not None:
        return int(dist.get_rank())
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if "LOCAL_RANK" in env and not ("SLURM_PROCID" in env and _slurm_multi_task()):
        # Lightning's popen children: NODE_RANK * processes per node + LOCAL_RANK; the parent
        # exports WORLD_SIZE and the node count only through NODE_RANK, so per node = world/nodes.
        node = int(env.get("NODE_RANK", "0"))
        per_node = int(env.get("LOCAL_WORLD_SIZE", "0")) or _per_node_from_world(node)
        return node * per_node + int(env["LOCAL_RANK"])
    if "SLURM_PROCID" in env and _slurm_multi_task():
        return int(env["SLURM_PROCID"])
    for key in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "JSM_NAMESPACE_RANK"):
        if key in env:
            return int(env[key])
    return 0


def _per_node_from_world(node: int) -> int:
    # Only used for node > 0 (node 0 multiplies by 0); WORLD_SIZE / NUM_NODES when known.
    if node == 0:
        return 0
    nodes = int(os.environ.get("NUM_NODES", os.environ.get("SLURM_NNODES", "1")) or 1)
    return int(os.environ.get("WORLD_SIZE", "1")) // max(1, nodes)


def local_rank() -> int:
    env = os.environ
    if "LOCAL_RANK" in env:
        return int(env["LOCAL_RANK"])
    if "SLURM_LOCALID" in env and _slurm_multi_task():
        return int(env["SLURM_LOCALID"])
    for key in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        if key in env:
            return int(env[key])
    return 0


def world_size() -> int:
    dist = _dist_group()
    if dist is not None:
        return int(dist.get_world_size())
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if _slurm_multi_task():
        return int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")))
    for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if key in env:
            return int(env[key])
    return 1


def is_rank_zero() -> bool:
    return global_rank() == 0


def job_id() -> str:
    """An id shared by every rank of one job (and different across jobs/requeues where the
    launcher provides one): SLURM job + step, torchrun's run id, else the master address/port."""
    env = os.environ
    if "SLURM_JOB_ID" in env:
        return f"slurm-{env['SLURM_JOB_ID']}-{env.get('SLURM_STEP_ID', '')}-{env.get('SLURM_RESTART_COUNT', '0')}"
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":  # "none": torchrun without a run id
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    if "MASTER_PORT" in env:
        return f"master-{env.get('MASTER_ADDR', '')}:{env['MASTER_PORT']}"
    return ""
