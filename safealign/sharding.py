"""Sharded models: full weights out of ZeRO-3 / FSDP, LoRA merged, and rank-sharded passes.

Every function here that touches a sharded model is COLLECTIVE: all ranks call it in the same
order, or the job hangs in an all-gather (issue 9 item 2). They are written against the model
object itself, so the same code serves Lightning runs and raw ``deepspeed.initialize`` (tested
on CPU with ``DS_ACCELERATOR=cpu``):

* ZeRO-3 parameters (``ds_id`` attribute, local tensor empty) are gathered a group at a time
  with ``deepspeed.zero.GatheredParameters`` and copied to CPU on rank 0 only (what DeepSpeed's
  consolidated 16-bit state dict does, without needing the engine).
* FSDP1 / FSDP2 (DTensor) parameters go through torch's
  ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``: full tensors on rank 0 only.
* Plain modules (single process, DDP): the state dict itself.

LoRA adapters are merged from the gathered state dict (:func:`merge_lora`), so a LoRA run
exports a normal model under every strategy; peft's own ``merge_and_unload`` cannot run on a
sharded module.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from safealign.ranks import global_rank, world_size

log = logging.getLogger(__name__)
_GATHER_NUMEL = 50_000_000  # ZeRO-3: parameters gathered per all-gather group (memory bound)


def layout(model: nn.Module) -> str:
    """ "zero3", "fsdp2", "fsdp1" or "plain": how this module's parameters are stored."""
    for p in model.parameters():
        if hasattr(p, "ds_id"):
            return "zero3"
        if type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor":
            return "fsdp2"
        if type(p).__name__ == "FlatParameter" or hasattr(p, "_fsdp_flattened"):
            return "fsdp1"
    return "plain"


def is_sharded(model: nn.Module) -> bool:
    return layout(model) != "plain"


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _zero3_groups(named: list[tuple[str, Tensor]]) -> Iterator[list[tuple[str, Tensor]]]:
    group, size = [], 0
    for name, t in named:
        group.append((name, t))
        size += int(getattr(t, "ds_numel", t.numel()))
        if size >= _GATHER_NUMEL:
            yield group
            group, size = [], 0
    if group:
        yield group


def _zero3_state_dict(model: nn.Module, rank0: bool) -> dict[str, Tensor] | None:
    import deepspeed

    named = list(model.state_dict(keep_vars=True).items())
    out: dict[str, Tensor] = {}
    seen: dict[int, str] = {}  # tied parameters appear under several names: gather once
    for group in _zero3_groups(named):
        params = [t for _, t in group if hasattr(t, "ds_id") and id(t) not in seen]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for name, t in group:
                if rank0:
                    first = seen.get(id(t))
                    out[name] = out[first] if first else t.detach().to("cpu", copy=True)
                seen.setdefault(id(t), name)
    return out if rank0 else None


def _torch_full_state_dict(model: nn.Module, rank0: bool) -> dict[str, Tensor] | None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)  # collective; full tensors on rank 0 only
    return sd if rank0 else None


def full_state_dict(model: nn.Module) -> dict[str, Tensor] | None:
    """The full (unsharded) CPU state dict on rank 0, None on other ranks. COLLECTIVE when the
    model is sharded; for a plain model every rank gets it (no communication)."""
    kind = layout(model)
    rank0 = global_rank() == 0
    if kind == "zero3":
        return _zero3_state_dict(model, rank0)
    if kind in ("fsdp1", "fsdp2") and _dist_ready():
        return _torch_full_state_dict(model, rank0)
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def preload_model_classes(model_factory) -> list[str]:
    """Import the transformers model classes a factory will build, BEFORE the strategy enters
    ``deepspeed.zero.Init``: importing transformers' modelling modules inside it fails (it patches
    ``torch.Tensor.__new__`` and dynamo's ``substitute_in_graph`` rejects the signature), which is
    exactly where Lightning calls ``configure_model`` under strategy=deepspeed_z3. Returns the
    class names imported. Classes come from a local model's ``config.json`` ``architectures``
    and from ``from transformers import ...`` lines in the factory's source."""
    import transformers

    func = getattr(model_factory, "func", model_factory)
    kwargs = dict(getattr(model_factory, "keywords", {}) or {})
    names: list[str] = []
    src = kwargs.get("name_or_path")
    if src and not Path(str(src)).exists():  # a hub id: its cached snapshot, if any
        from safealign.models.checks import cached_snapshot_dir

        src = cached_snapshot_dir(str(src))
    if src and (Path(str(src)) / "config.json").is_file():
        names += json.loads((Path(str(src)) / "config.json").read_text()).get("architectures") or []
    with contextlib.suppress(OSError, TypeError):
        for line in re.findall(r"from transformers import ([^\n]+)", inspect.getsource(func)):
            names += [n.strip(" ()") for n in line.split(",")]
    loaded = []
    for name in dict.fromkeys(n for n in names if n):
        with contextlib.suppress(AttributeError, ImportError, RuntimeError):
            getattr(transformers, name)
            loaded.append(name)
    importlib.import_module(func.__module__)
    return loaded


@contextlib.contextmanager
def hf_zero3(ds_config: dict | None) -> Iterator[None]:
    """Tell transformers that ZeRO-3 is on while models are built, so ``from_pretrained`` inside
    ``deepspeed.zero.Init`` loads the checkpoint into the partitions (and runs its init under
    gathered parameters) instead of writing into empty shards. No-op for other configs."""
    stage = ((ds_config or {}).get("zero_optimization") or {}).get("stage")
    if stage != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        del keep
        unset_hf_deepspeed_config()


# --- LoRA ------------------------------------------------------------------------------------

_LORA_A = re.compile(r"^(?P<mod>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")


def _lora_scaling(cfg) -> float:
    # peft LoraLayer.update_layer: alpha / r, or alpha / sqrt(r) with rsLoRA
    r = cfg.r
    return cfg.lora_alpha / (r**0.5 if getattr(cfg, "use_rslora", False) else r)


def merge_lora(
    state: dict[str, Tensor], peft_config, adapter: str = "default"
) -> dict[str, Tensor]:
    """Merge a peft LoRA state dict into base weights: W <- W + s * (B @ A) (transposed for
    fan_in_fan_out layers such as GPT-2's Conv1D), keys renamed to the base model's.

    Matches ``PeftModel.merge_and_unload`` (tests/test_sharded.py); refuses variants whose merge
    is not this formula (DoRA, layers other than Linear/Conv1D).
    """
    if getattr(peft_config, "use_dora", False):
        raise ValueError(
            "LoRA export under sharding: DoRA merge is not supported; use use_dora=false"
        )
    s = _lora_scaling(peft_config)
    fan_in_fan_out = bool(getattr(peft_config, "fan_in_fan_out", False))
    merged: dict[str, Tensor] = {}
    for key, val in state.items():
        m = _LORA_A.match(key)
        if m is None or m["adapter"] != adapter:
            continue
        mod = m["mod"]
        b = state[f"{mod}.lora_B.{adapter}.weight"]
        delta = (b.float() @ val.float()) * s
        base = state[f"{mod}.base_layer.weight"]
        if fan_in_fan_out or delta.shape != base.shape:
            delta = delta.T
        merged[f"{mod}.base_layer.weight"] = (base.float() + delta).to(base.dtype)
    out: dict[str, Tensor] = {}
    for key, val in state.items():
        if "lora_embedding" in key or "lora_magnitude" in key:
            raise ValueError(f"LoRA export under sharding: cannot merge {key!r} (embedding/DoRA)")
        if ".lora_" in key:
            continue
        if ".original_module." in key:  # modules_to_save: the trained copy replaces it
            continue
        val = merged.get(key, val)
        key = key.replace(f".modules_to_save.{adapter}.", ".").replace(".base_layer.", ".")
        out[key.removeprefix("base_model.model.")] = val
    return out


# --- export ----------------------------------------------------------------------------------


def export_pretrained(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Gather full weights (collective), merge LoRA, and ``save_pretrained`` on rank 0 (safetensors,
    with the tokenizer). Every rank must call it; returns the directory on every rank."""
    out = Path(out_dir)
    sharded = is_sharded(model)
    if not sharded and hasattr(model, "merge_and_unload"):
        state = None  # plain peft model: peft merges in place (the reference implementation)
    else:
        state = full_state_dict(model)
    if global_rank() != 0:
        _barrier()
        return out
    target = model
    if hasattr(model, "merge_and_unload") and state is None:
        target = model.merge_and_unload()
    elif hasattr(model, "peft_config"):
        state = merge_lora(state, model.peft_config[model.active_adapter])
        target = model.get_base_model()
    elif state is not None and not sharded:
        state = None  # let save_pretrained read the live (unsharded) module
    if state is not None:
        state = _drop_tied(state, target)
    target.save_pretrained(out, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _barrier()
    return out


def _drop_tied(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Keep one name per tied parameter (e.g. GPT-2's lm_head = wte), as save_pretrained does for
    a live model; a gathered state dict has separate copies it cannot recognise as tied."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    drop = {n for group in names.values() for n in group[1:]}
    return {k: v for k, v in state.items() if k not in drop}


def _barrier() -> None:
    if _dist_ready() and world_size() > 1:
        torch.distributed.barrier()


# --- rank-sharded inference passes -----------------------------------------------------------


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Rows ``rank, rank + world, ...`` of ``n``, padded with the last row so every rank runs
    the same number of batches (sharded forwards are collective)."""
    mine = list(range(rank, n, world))
    per_rank = -(-n // world)
    return mine + [mine[-1] if mine else n - 1] * (per_rank - len(mine))


def gather_by_index(local: dict[str, Tensor], index: Tensor, n: int, device) -> dict[str, Tensor]:
    """Reassemble per-row results computed on each rank's share into full (n,) CPU tensors,
    ordered by row index. Padding rows (repeats) carry identical values, so overwriting is safe."""
    if not (_dist_ready() and world_size() > 1):
        order = index.argsort()
        return {k: v[order] for k, v in local.items()}
    dist = torch.distributed
    idx = index.to(device)
    gathered_idx = [torch.empty_like(idx) for _ in range(world_size())]
    dist.all_gather(gathered_idx, idx)
    full_idx = torch.cat(gathered_idx).cpu()
    out: dict[str, Tensor] = {}
    for key in sorted(local):  # same order on every rank
        v = local[key].to(device)
        parts = [torch.empty_like(v) for _ in range(world_size())]
        dist.all_gather(parts, v)
        res = torch.empty(n, dtype=v.dtype)
        res[full_idx] = torch.cat(parts).cpu()
        out[key] = res
    return out


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)
