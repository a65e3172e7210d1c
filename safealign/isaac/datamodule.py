"""ISAAC training data: multi-target records resampled per tempering stage (docs/methods.md B.4, B.5).

The corpus is embedded once (cached by content), neighbourhoods and DBSCAN are computed once
(cached by embeddings, K and eps), and each tempering stage only redraws the M pseudo targets with
seed + stage index (the authors' code reseeded every stage identically; B.5 "Tempering resample").
Validation measures the loss on each held-out context's ORIGINAL response (M copies).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from safealign.data.datamodule import DataModule
from safealign.errors import ConfigError
from safealign.isaac.encoder import embed_cached
from safealign.isaac.sampler import (
    as_multi_target,
    draw_targets,
    original_mask,
    prepare_neighbourhoods,
)
from safealign.types import UNSAFE, DialogueExample, MultiTargetExample

log = logging.getLogger(__name__)


class IsaacDataModule(DataModule):
    """Args (beyond DataModule): encoder: an `encode(texts)` object (safealign.isaac.encoder);
    sampler: keyword arguments of `draw_targets` (top_k, top_p, tau, scale, mode, m, keep_original);
    k, eps, neighbours: context top-K and DBSCAN radius (B.2 steps 3-4);
    epochs_per_stage: tempering stage length; stage s resamples with seed + s (B.4)."""

    def __init__(self, source, encoder, sampler: dict, k: int = 150, eps: float = 0.22,
                 neighbours: str = "exact", epochs_per_stage: int = 1, cache_dir: str | None = None,
                 **kwargs) -> None:
        super().__init__(source=source, **kwargs)
        if epochs_per_stage < 1:
            raise ConfigError("data.epochs_per_stage", f"must be >= 1, got {epochs_per_stage}")
        self.dialogues: list[DialogueExample] = list(self.corpus.train)
        if not self.dialogues or not isinstance(self.dialogues[0], DialogueExample):
            raise ConfigError("data.source", "ISAAC samples from (context, response) dialogues")
        self.sampler = dict(sampler)
        self.epochs_per_stage, self.stage = epochs_per_stage, 0
        cache = Path(cache_dir) if cache_dir else None
        contexts = [d.context for d in self.dialogues]
        responses = [d.response for d in self.dialogues]
        ctx_emb = embed_cached(contexts, encoder, cache)
        resp_emb = embed_cached(responses, encoder, cache)
        self.nb = prepare_neighbourhoods(ctx_emb, resp_emb, k=k, eps=eps, neighbours=neighbours, cache_dir=cache)
        self.is_original = original_mask(self.nb, responses)
        self.sample_stats: list[dict] = []
        m = int(self.sampler.get("m", 3))
        self.corpus.train = self._draw(0)
        self.corpus.val = [MultiTargetExample(d.context, (d.response,) * m, d.response) for d in self.corpus.val]
        self.corpus.test = [MultiTargetExample(d.context, (d.response,) * m, d.response) for d in self.corpus.test]

    def _draw(self, stage: int) -> list[MultiTargetExample]:
        rng = np.random.default_rng(self.seed + stage)  # per-stage reseed (B.5)
        result = draw_targets(self.nb, self.is_original, rng=rng, **self.sampler)
        stats = {"stage": stage, **result.summary()}
        labels = np.array([d.label == UNSAFE for d in self.dialogues])
        if labels.any():  # ground truth available (built-in, DiaSafety): the assumption check
            stats["raw_unsafe_rate"] = float(labels.mean())
            stats["target_unsafe_rate"] = float(labels[result.targets].mean())
        log.info("isaac stage %d sampling: %s", stage, stats)
        self.sample_stats.append(stats)
        texts = [d.response for d in self.dialogues]
        return as_multi_target([d.context for d in self.dialogues], texts, result)

    def train_dataloader(self):
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        stage = epoch // self.epochs_per_stage
        if stage != self.stage:  # tempering: resample and continue from the current weights
            self.stage = stage
            self.corpus.train = self._draw(stage)
            self.encoded["train"] = [self._encode(r) for r in self.corpus.train]
        return super().train_dataloader()
