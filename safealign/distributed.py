"""Distributed strategies: the DeepSpeed config the project generates, FSDP wrap policies, and
the rule for which strategies may run inside a Hydra multirun.

`deepspeed_config` is the single source of the DeepSpeed JSON: `conf/strategy/deepspeed_*.yaml`
hand it to Lightning's `DeepSpeedStrategy(config=...)`, and `scripts/deepspeed_smoke.py` feeds the
same dict to raw `deepspeed.initialize` (how it is tested on CPU: Lightning's DeepSpeed strategy
refuses CPU, raw DeepSpeed does not; docs/cluster.md lists what ran on CPU).

Frozen models and ZeRO-3 (Lightning #17523/#19042): with the default
`method.precompute_reference=true` the reference log-probs are computed once and the module holds
ONE model, so ZeRO-3 shards exactly one set of weights. With `precompute_reference=false` the
frozen reference is a plain attribute (a one-element list, deliberately not a submodule): ZeRO-3
and FSDP do not see it, so it is NOT sharded and every rank holds a full fp32 replica of it.
For models that do not fit twice per GPU, keep the precompute default or use LoRA (the reference
is then the base model with the adapter disabled, no copy).
"""

from __future__ import annotations

import importlib
from typing import Any

from safealign.errors import ConfigError

# Lightning precision flag -> DeepSpeed precision section. fp16 uses DeepSpeed's dynamic loss
# scaler (loss_scale 0); V100 has no bf16 (trainer=gpu_v100 selects 16-mixed).
_PRECISION: dict[str, dict[str, Any]] = {
    "32-true": {},
    "32": {},
    "bf16-mixed": {"bf16": {"enabled": True}},
    "bf16-true": {"bf16": {"enabled": True}},
    "16-mixed": {
        "fp16": {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    },
}
_PRECISION["16-true"] = _PRECISION["16-mixed"]


def _zero_section(stage: int, offload: bool, bucket_size: int, pin_memory: bool) -> dict:
    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": bucket_size,
    }
    if stage <= 2:
        zero["allgather_bucket_size"] = bucket_size
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=bucket_size,
            stage3_param_persistence_threshold=100_000,
            stage3_max_live_parameters=1_000_000_000,
            # save full (gathered) weights, so `export()` writes a normal HF model
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
        if stage == 3:  # parameter offload exists only for ZeRO-3
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    return zero


def deepspeed_config(
    stage: int = 2,
    offload: bool = False,
    precision: str = "32-true",
    micro_batch_size: int | None = None,
    grad_accum: int | None = None,
    gradient_clipping: float | None = None,
    optimizer: dict | None = None,
    bucket_size: int = 200_000_000,
    pin_memory: bool = True,
) -> dict:
    """The DeepSpeed config dict for ZeRO `stage` (1-3), optionally with CPU offload.

    Args:
        stage: ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters.
        offload: move optimizer states (stage >= 1) and, for stage 3, parameters to CPU RAM.
        precision: the Lightning precision flag (`${trainer.precision}`).
        micro_batch_size, grad_accum, gradient_clipping: only for raw `deepspeed.initialize`;
            leave them None under Lightning, which fills them from the Trainer and rejects
            `gradient_accumulation_steps` in a user config.
        optimizer: a DeepSpeed `optimizer` section (raw use; Lightning uses the module's own).
        bucket_size: reduce/all-gather bucket size in elements.
        pin_memory: pinned host buffers for offload (needs a GPU; set false on CPU-only hosts).

    Returns:
        A JSON-serialisable dict.
    """
    _check_args(stage, precision, bucket_size)
    cfg: dict[str, Any] = {
        "zero_optimization": _zero_section(stage, offload, bucket_size, pin_memory),
        # our optimizers come from `method.optimizer` (AdamW), which DeepSpeed calls "untested"
        "zero_allow_untested_optimizer": True,
        **_PRECISION[precision],
    }
    raw_only = {  # raw `deepspeed.initialize` keys; Lightning fills (or rejects) them itself
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": gradient_clipping,
        "optimizer": optimizer,
    }
    return cfg | {k: v for k, v in raw_only.items() if v is not None}


def _check_args(stage: int, precision: str, bucket_size: int) -> None:
    """Name the config key of a bad value before DeepSpeed sees it."""
    if stage not in (1, 2, 3):
        raise ConfigError(
            "trainer.strategy.config.stage", f"ZeRO stage must be 1, 2 or 3, got {stage!r}"
        )
    if precision not in _PRECISION:
        raise ConfigError(
            "trainer.precision", f"DeepSpeed supports {sorted(_PRECISION)}, got {precision!r}"
        )
    if bucket_size < 1:
        raise ConfigError("trainer.strategy.config.bucket_size", f"must be >= 1, got {bucket_size}")


def module_classes(paths: list[str]) -> set[type]:
    """Import classes by dotted path, e.g. for FSDP's `auto_wrap_policy` (a set of layer classes)."""
    out: set[type] = set()
    for path in paths:
        mod_name, _, cls_name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod_name), cls_name)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(
                "trainer.strategy.auto_wrap_policy", f"cannot import {path!r}: {e}"
            ) from e
        out.add(cls)
    return out


_REEXEC = ("DeepSpeedStrategy", "FSDPStrategy", "FSDP2Strategy", "ModelParallelStrategy")


def starts_script_subprocesses(strategy: Any, devices: Any, num_nodes: Any = 1) -> bool:
    """True when Lightning would re-execute `sys.argv` to start the other ranks.

    That is DDP with the default `start_method="popen"` and more than one process (or `auto`
    devices). Inside a Hydra multirun every re-executed rank re-runs the whole sweep (and the
    optuna sweeper samples different values per rank): lightning-hydra-template#393.
    `ddp_spawn` forks from Python instead, and SLURM starts one task per device itself.
    """
    if isinstance(strategy, str):
        is_ddp = strategy in ("ddp", "ddp_find_unused_parameters_true")
    elif hasattr(strategy, "get"):
        target = str(strategy.get("_target_", ""))
        is_ddp = target.endswith("DDPStrategy") and strategy.get("start_method", "popen") == "popen"
        # DeepSpeed, FSDP1 and ModelParallel/FSDP2 always launch ranks by re-executing the script
        is_ddp = is_ddp or target.endswith(_REEXEC)
    else:
        is_ddp = type(strategy).__name__ in ("DDPStrategy", *_REEXEC)
    if not is_ddp:
        return False
    if (
        isinstance(devices, (list, tuple))
        or hasattr(devices, "__len__")
        and not isinstance(devices, str)
    ):
        devices = len(devices)
    if not isinstance(devices, int) or not isinstance(num_nodes, int) or devices == -1:
        return True  # "auto" / -1 (all devices): may well be more than one process
    return devices * num_nodes > 1
