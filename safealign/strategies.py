"""Lightning strategies with the fixes sharded runs need (issue 9). They import Lightning, so
they live apart from :mod:`safealign.distributed` (imported by Hydra callbacks at start-up).

* :class:`FSDP2Strategy`: torch FSDP2 ``fully_shard`` through ``ModelParallelStrategy``.
* :class:`DeepSpeedStrategy`: Lightning's, plus transformers told that ZeRO-3 is on while the
  model is built, so ``model=hf`` (``from_pretrained``) inside ``deepspeed.zero.Init`` loads the
  weights into the partitions instead of failing on 0-element shards (shown on CPU by
  scripts/zero3_check.py: without it, "ignore_mismatched_sizes" RuntimeError on every rank).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeed
from lightning.pytorch.strategies import ModelParallelStrategy

from safealign.distributed import module_classes
from safealign.errors import ConfigError


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel with torch FSDP2 (``fully_shard``) through Lightning's
    ``ModelParallelStrategy``: every process is one data-parallel rank (no tensor parallelism).

    Unlike Lightning's FSDP1 ``FSDPStrategy`` this runs on CPU with gloo, so the sharded path is
    tested on CPU (tests/test_sharded.py). The module's ``configure_model`` hands its freshly built
    model to :meth:`shard_module` (no strategy dispatch in the method code: any strategy with a
    ``shard_module`` shards there).

    Args:
        wrap_classes: dotted paths of the layer classes that each become one FSDP unit (decoder
            blocks); the root module is sharded last.
        reshard_after_forward: free gathered parameters after each block's forward (ZeRO-3-like);
            false keeps them until backward (ZeRO-2-like, more memory, less communication).
        activation_checkpointing: recompute each wrapped block in backward.
        save_distributed_checkpoint: per-rank checkpoint shards (a directory) instead of a full
            rank-0 file; both resume.
    """

    def __init__(
        self,
        wrap_classes: list[str] | None = None,
        reshard_after_forward: bool = True,
        activation_checkpointing: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self.wrap_classes = tuple(module_classes(list(wrap_classes or [])))
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing

    def setup_environment(self) -> None:
        # pure data parallel over every process (ModelParallelStrategy's "auto" means one
        # data-parallel group per NODE, with tensor parallelism inside it)
        self._data_parallel_size = self.num_processes * self.num_nodes
        super().setup_environment()

    def shard_module(self, model):
        """Apply ``fully_shard`` to every block of ``wrap_classes``, then to the root."""
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        blocks = [
            m for m in model.modules() if self.wrap_classes and isinstance(m, self.wrap_classes)
        ]
        if not blocks:
            raise ConfigError(
                "trainer.strategy.wrap_classes",
                f"no layer of {type(model).__name__} matches {[c.__name__ for c in self.wrap_classes]}; "
                "list your architecture's decoder block class",
            )
        if self.activation_checkpointing:
            _checkpoint_blocks(model, self.wrap_classes)
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        return model


def _checkpoint_blocks(model, classes: tuple[type, ...]) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, classes))


class DeepSpeedStrategy(_LightningDeepSpeed):
    """Lightning's DeepSpeedStrategy; under ZeRO-3 the model is built with transformers aware of
    it (:func:`safealign.sharding.hf_zero3`). Same arguments as Lightning's."""

    @contextlib.contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        from safealign.sharding import hf_zero3

        self._init_config_if_needed()
        with hf_zero3(self.config if self.zero_stage_3 else None), super().model_sharded_context():
            yield
