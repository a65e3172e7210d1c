"""safealign's reference and export functions on a real DeepSpeed ZeRO-3 model (issue 9 item 7).

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 scripts/zero3_check.py --out-dir d/

Lightning's DeepSpeedStrategy refuses CPU; raw DeepSpeed with gloo does not (ENV.md). This builds
the tiny GPT-2 INSIDE ``deepspeed.zero.Init`` (parameters partitioned at construction, as
Lightning's ``configure_model`` does under strategy=deepspeed_z3), wraps it with
``deepspeed.initialize`` using the config safealign generates, then runs the project's own
``sharded_reference`` (reference log-probs, each rank scoring half the rows, gathered) and
``export_pretrained`` (gathered full weights, written by rank 0). Rank 0 writes
``zero3.json`` (log-probs, local parameter sizes) and the export; tests/test_sharded.py compares
them with the same model built without DeepSpeed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

SEED, N_PAIRS, MAX_LEN = 0, 10, 48


def tokenizer(cache_dir: Path):
    from safealign.data.builtin import builtin_preferences
    from safealign.models import train_bpe_tokenizer

    texts = [t for p in builtin_preferences(size=60, seed=SEED).train for t in (p.prompt, p.chosen)]
    return train_bpe_tokenizer(texts, vocab_size=300, cache_dir=str(cache_dir))


def build(tok):
    from safealign.models import build_tiny_gpt2

    return build_tiny_gpt2(tok, n_layer=2, n_head=2, n_embd=32, n_positions=64, seed=SEED)


def items(tok) -> list:
    """(index, encoded triple) rows exactly as the DataModule makes them for ADPO."""
    from safealign.data.builtin import builtin_preferences
    from safealign.data.collate import encode
    from safealign.data.control import with_control_token

    rows = builtin_preferences(size=60, seed=SEED).train[:N_PAIRS]
    out = []
    for i, r in enumerate(rows):
        enc = {k: encode(tok, r.prompt, getattr(r, k) or r.rejected, 24, MAX_LEN)
               for k in ("chosen", "rejected", "toxic")}  # fmt: skip
        enc["toxic_ctx"] = encode(tok, with_control_token(r.prompt), r.toxic or r.rejected, 24, MAX_LEN)
        out.append((i, enc))
    return out


def ds_config() -> dict:
    from safealign.distributed import deepspeed_config

    optimizer = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0, "torch_adam": True}}
    return deepspeed_config(stage=3, precision="32-true", micro_batch_size=2, grad_accum=1,
                            optimizer=optimizer, pin_memory=False)  # fmt: skip


def _gather_each(module) -> dict:
    import deepspeed

    out = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone().cpu().contiguous()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, required=True)
    a = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    from safealign.data.collate import PreferenceCollator
    from safealign.io import write_json
    from safealign.methods.reference import sharded_reference
    from safealign.models import load_causal_lm
    from safealign.sharding import export_pretrained, hf_zero3, layout, preload_model_classes

    deepspeed.init_distributed(dist_backend="gloo")
    tok = tokenizer(a.out_dir / "cache")
    cfg = ds_config()
    from safealign.models import build_tiny_gpt2

    preload_model_classes(build_tiny_gpt2)  # as BaseModule does before Lightning's zero.Init
    with deepspeed.zero.Init(config_dict_or_path=cfg):
        model = build(tok)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    module = engine.module
    local = {n: int(p.numel()) for n, p in module.named_parameters()}
    ref = sharded_reference(module, items(tok), PreferenceCollator(tok.pad_token_id), 3, False,
                            torch.device("cpu"))  # fmt: skip
    export_pretrained(module, tok, a.out_dir / "export")
    independent = _gather_each(module)  # per-parameter gathers: an independent check of export
    # from_pretrained INSIDE zero.Init, as Lightning's configure_model runs it for `model=hf`:
    # transformers loads into the partitions only when it knows ZeRO-3 is on (HfDeepSpeedConfig)
    with hf_zero3(cfg), deepspeed.zero.Init(config_dict_or_path=cfg):
        loaded = load_causal_lm(tok, str(a.out_dir / "export"))
    reloaded = _gather_each(loaded)
    if dist.get_rank() == 0:
        from safetensors.torch import save_file

        save_file(independent, str(a.out_dir / "gathered.safetensors"))
        save_file(reloaded, str(a.out_dir / "reloaded.safetensors"))
        write_json(a.out_dir / "zero3.json", {
            "layout": layout(module), "world_size": dist.get_world_size(),
            "local_numel": local, "reference": {k: v.tolist() for k, v in ref.items()},
        })  # fmt: skip
    dist.barrier()


if __name__ == "__main__":
    main()
