"""Evaluation at the end of a training run (the ``eval`` group, conf/eval; docs/methods.md A.6).

:func:`plan_eval` loads the eval set and builds the scorers BEFORE training (a missing data file
or a bad scorer fails in seconds, not after hours); :meth:`InRunEval.__call__` then samples the
exported model through :func:`safealign.eval.evaluate.evaluate_models` (the same generation,
scoring and table as ``evaluate.py``) into ``<run dir>/eval/`` and returns ``eval/<metric>`` for
every numeric key of the model's row (intervals ``_lo``/``_hi`` included) plus
``eval/safety_objective`` with its own 95% bootstrap interval (:mod:`safealign.eval.objective`).
Rank 0 only: the other ranks of a DDP/FSDP job get no plan (the exported model is on disk by
then, so nothing collective is left to do).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from safealign.errors import ConfigError
from safealign.eval.eval_sets import check_prompts
from safealign.eval.evaluate import evaluate_models
from safealign.eval.objective import LAMBDA_EVASIVE, objective_with_interval, prefixed
from safealign.generation import SamplingConfig, check_sampling
from safealign.ranks import is_rank_zero

log = logging.getLogger("safealign.eval")
EVAL_DIR = "eval"  # under the run dir: generations/, scored/, table.md/csv/json, bars.png


@dataclass
class InRunEval:
    """Everything the end-of-run evaluation needs, checked before training."""

    name: str  # the model's row name in the table (the run's task_name)
    prompts: list[dict]
    scorers: dict
    sampling: SamplingConfig
    seed: int
    threshold: float = 0.5
    lambda_evasive: float = LAMBDA_EVASIVE
    n_boot: int = 1000
    notes: list[str] = field(default_factory=list)

    def __call__(
        self, run_dir: Path, loggers: list | tuple = (), step: int | None = None,
        device: str = "cpu",
    ) -> dict[str, float]:
        """Evaluate ``run_dir/model``; returns the ``eval/*`` metrics, also logged to ``loggers``
        at ``step`` (the trainer's last global step)."""
        out = Path(run_dir) / EVAL_DIR
        table = evaluate_models(
            {self.name: Path(run_dir) / "model"}, self.prompts, scorers=self.scorers,
            sampling=self.sampling, seed=self.seed, out_dir=out, threshold=self.threshold,
            n_boot=self.n_boot, notes=self.notes, device=device,
        )  # fmt: skip
        metrics = prefixed({k: v for k, v in table[0].items() if k != "model"})
        metrics |= prefixed(self.objective(out / "scored" / f"{self.name}.jsonl"))
        log_metrics(loggers, metrics, step)
        log.info("evaluation: %s", out / "table.md")
        return metrics

    def objective(self, scored_path: Path) -> dict[str, float]:
        lines = scored_path.read_text(encoding="utf-8").splitlines()
        scored = [json.loads(line) for line in lines if line.strip()]
        obj = objective_with_interval(
            scored, threshold=self.threshold, lambda_evasive=self.lambda_evasive,
            n_boot=self.n_boot, seed=self.seed,
        )  # fmt: skip
        if not obj:
            log.warning("no response was scored (all empty): no safety objective")
        return obj


def log_metrics(loggers: list | tuple, metrics: dict[str, float], step: int | None = None) -> None:
    """``metrics`` to every Lightning logger (CSV, W&B, ...), and into W&B's run summary, which
    is what a W&B sweep reads its ``metric.name`` from."""
    for lg in loggers:
        lg.log_metrics(metrics, step=step)
        summary = getattr(getattr(lg, "experiment", None), "summary", None)
        if callable(getattr(summary, "update", None)):
            summary.update(metrics)
        lg.save()  # Lightning finalised the loggers when fit ended: flush this late row too


def _name(cfg: DictConfig) -> str:
    # evaluate_models accepts letters, digits and _ . - only in a model name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(cfg.get("task_name") or "model"))


def _prompts(ev: DictConfig) -> list[dict]:
    prompts = check_prompts(instantiate(ev.eval_set), "eval.eval_set")
    skip = int(ev.get("skip_prompts") or 0)
    if skip >= len(prompts):
        raise ConfigError(
            "eval.skip_prompts", f"{skip} skips all {len(prompts)} prompts of eval.eval_set"
        )
    stop = None if ev.get("max_prompts") is None else skip + int(ev.max_prompts)
    return prompts[skip:stop]


def _sampling(node: DictConfig) -> SamplingConfig:
    s = instantiate(node, _convert_="all")
    s = dataclasses.replace(s, temperatures=tuple(float(t) for t in s.temperatures))
    try:
        check_sampling(s)
    except ConfigError as e:  # name the key where it is set: eval.sampling.*
        raise ConfigError(e.key.replace("generation.", "eval.sampling.", 1), str(e)) from e
    return s


def plan_eval(cfg: DictConfig) -> InRunEval | None:
    """The run's end-of-run evaluation, prepared now (None: ``eval`` unset, or not rank 0).

    Loads the eval set (``skip_prompts`` then ``max_prompts`` applied) and instantiates the
    scorers (they load weights lazily), so every input is checked before any training."""
    ev = cfg.get("eval")
    if ev is None or not is_rank_zero():
        return None
    prompts = _prompts(ev)
    scorers = {k: instantiate(v) for k, v in ev.scorers.items() if v is not None}
    name = ev.eval_set.get("_target_", "?").rsplit(".", 1)[-1]
    return InRunEval(
        name=_name(cfg), prompts=prompts, scorers=scorers, sampling=_sampling(ev.sampling),
        seed=int(cfg.seed), threshold=float(ev.threshold),
        lambda_evasive=float(ev.lambda_evasive), n_boot=int(ev.n_boot),
        notes=[f"eval set: {name} ({len(prompts)} prompts, first {ev.get('skip_prompts') or 0} "
               f"skipped); safety objective = toxicity_rate + {ev.lambda_evasive} x "
               f"evasiveness_rate, 95% bootstrap over prompts"],
    )  # fmt: skip
