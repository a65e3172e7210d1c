"""Run a few raw-DeepSpeed ZeRO steps with the config safealign generates, and report them.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 scripts/deepspeed_smoke.py z2 z3 --out-dir d/

Lightning's DeepSpeedStrategy refuses CPU, raw DeepSpeed does not (ENV.md "Distributed on CPU"),
so this exercises `safealign.distributed.deepspeed_config` through `deepspeed.initialize` with
gloo. On a GPU node drop DS_ACCELERATOR to smoke-test the same config on CUDA.

Data-parallel layout: the global batch of each step is split into one contiguous micro-batch per
rank. Sequences have a fixed length (no padding), so every rank averages over the same number of
tokens and the rank-averaged gradient equals the full-batch gradient: `reference()` (plain
PyTorch, one process, whole global batch) must then give the same losses and final weights, up
to float reduction order. Rank 0 writes losses and final (gathered) weights.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

VOCAB, SEQ_LEN, LR, CLIP = 97, 16, 1.0e-3, 1.0


def build_model(seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=32, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):  # never move the caller's global RNG
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def global_batches(steps: int, global_batch: int, seed: int) -> torch.Tensor:
    """Token ids, shape (steps, global_batch, SEQ_LEN): one fixed batch seen every step, so the
    loss must fall step after step (memorisation), a visible sign that the updates are applied."""
    gen = torch.Generator().manual_seed(seed + 1)
    batch = torch.randint(0, VOCAB, (global_batch, SEQ_LEN), generator=gen)
    return batch.expand(steps, -1, -1)


def reference(steps: int, global_batch: int, seed: int) -> tuple[list[float], dict]:
    """The same optimisation in one process without DeepSpeed: losses and final weights."""
    model = build_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for x in global_batches(steps, global_batch, seed):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def ds_config(stage: int, offload: bool, micro_batch: int) -> dict:
    from safealign.distributed import deepspeed_config

    # torch_adam: DeepSpeed's fused/CPU Adam kernels are not needed (nor built) on CPU.
    optimizer = {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0, "torch_adam": True}}
    cfg = deepspeed_config(stage=stage, offload=offload, precision="32-true",
                           micro_batch_size=micro_batch, grad_accum=1, gradient_clipping=CLIP,
                           optimizer=optimizer, pin_memory=False)
    if offload:  # a torch optimizer on offloaded states is allowed, if slow (CPU test only)
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def full_state_dict(engine, stage: int) -> dict:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        return {k: v.detach().clone().cpu() for k, v in engine.module.state_dict().items()}


CONFIGS = {"z1": (1, False), "z2": (2, False), "z3": (3, False),
           "z2_offload": (2, True), "z3_offload": (3, True)}


def run(name: str, steps: int, micro_batch: int, seed: int, out_dir: Path) -> None:
    import deepspeed
    import torch.distributed as dist

    stage, offload = CONFIGS[name]
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(seed)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(stage, offload, micro_batch))
    losses = []
    for x in global_batches(steps, micro_batch * world, seed):
        mine = x[rank * micro_batch:(rank + 1) * micro_batch]
        loss = engine(input_ids=mine, labels=mine).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # global-batch loss = mean of the equal-sized rank losses
        losses.append(mean.item() / world)
    state = full_state_dict(engine, stage)
    if rank == 0:
        from safetensors.torch import save_file

        from safealign.io import atomic_path, write_json

        with atomic_path(out_dir / f"{name}.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        write_json(out_dir / f"{name}.json", {"stage": stage, "offload": offload, "world_size": world,
                                               "micro_batch": micro_batch, "losses": losses,
                                               "config": ds_config(stage, offload, micro_batch)})
    engine.destroy()
    dist.barrier()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="+", choices=sorted(CONFIGS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("deepspeed_smoke"))
    a = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if os.environ["DS_ACCELERATOR"] == "cpu" else "nccl")
    for name in a.configs:  # one launch for all configs: imports and process start dominate
        run(name, a.steps, a.micro_batch, a.seed, a.out_dir)
        if int(os.environ.get("RANK", "0")) == 0:
            print(name, json.loads((a.out_dir / f"{name}.json").read_text())["losses"], flush=True)


if __name__ == "__main__":
    main()
