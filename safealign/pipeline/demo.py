"""`make demo`: the ADPO pipeline over several seeds and the paper's headline comparison in
miniature, SFT vs DPO vs ADPO on toxicity, evasiveness and coherence, pooled over seeds with
95% intervals and paired ADPO − SFT / ADPO − DPO differences
(the table: safealign.pipeline.summary), plus the ISAAC row (safealign.pipeline.isaac_demo).

The targets (ADPO toxicity below SFT's and not above DPO's, evasiveness not above DPO's) are
checked on the means and reported as met or NOT met, never forced (issue 4).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from safealign.pipeline.adpo import run_adpo_pipeline
from safealign.pipeline.isaac_demo import run_isaac_demo
from safealign.pipeline.summary import write_summary
from safealign.utils import terminal_quiet

log = logging.getLogger(__name__)
_META = ("_target_", "_partial_", "_recursive_", "seeds")
ISAAC = "isaac_demo"  # the ISAAC row's own stages: not part of the ADPO pipeline's config


@dataclass
class DemoResult:
    results: list = field(default_factory=list)  # one PipelineResult per seed
    summary: dict = field(default_factory=dict)  # model -> pooled row with <metric>_lo/_hi
    seconds: float = 0.0
    objective: float | None = None


def pipeline_settings(cfg: DictConfig) -> dict:
    """``cfg.pipeline`` resolved (under cfg's own seed) as keyword arguments of the runner."""
    node = OmegaConf.to_container(cfg.pipeline, resolve=True)
    return {
        k: OmegaConf.create(v) if isinstance(v, dict) else v
        for k, v in node.items()
        if k not in _META
    }


def _without_isaac(cfg: DictConfig) -> DictConfig:
    """The run config the stages derive from: the ISAAC row's node is not part of any stage."""
    c = copy.deepcopy(cfg)
    with open_dict(c):
        c.pop(ISAAC, None)
    return c


def run_demo(cfg: DictConfig, seeds: list[int], **_: object) -> DemoResult:
    """The whole ADPO pipeline once per seed (outputs in ``<run dir>/seed<N>``), then one table.

    The other ``pipeline.*`` keys are re-resolved per seed (``${seed}`` interpolations follow)."""
    t0 = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    results = []
    for seed in seeds:
        c = _without_isaac(cfg)
        with open_dict(c):
            c.seed, c.paths.output_dir = int(seed), str(out_dir / f"seed{seed}")
        log.info("\n=== seed %s ===", seed)
        with terminal_quiet():  # stage lines only: the per-seed table goes to the log file
            results.append(run_adpo_pipeline(c, **pipeline_settings(c)))
    if cfg.get(ISAAC):  # issue 5: the ISAAC row (its own cached stages)
        run_isaac_demo(_without_isaac(cfg), cfg[ISAAC])
    seconds = time.perf_counter() - t0
    summary = write_summary(out_dir, results, seconds)
    return DemoResult(results, summary, seconds)
