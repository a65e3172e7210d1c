"""One evaluation for every method: generate on eval prompts, score, tabulate (``evaluate.py``).

Per model: load (model dir or run dir), sample with :func:`safealign.generation.generate`, score
each response and reduce to one table row with 95% intervals (:mod:`safealign.eval.rows` holds
every metric definition: docs/methods.md A.5, B.7 and RealToxicityPrompts'). A nan toxicity score
(:class:`GroundTruthScorer` on text outside the corpus) is re-scored by the fallback scorer and
counted (``n_unknown``). ``f_nll``/``b_nll`` need ONE fixed scorer LM (``scorer_lm``): a
per-model scorer would not be comparable across models, so without it they are None.
"""

from __future__ import annotations

import gc
import logging
import re
from dataclasses import replace
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from safealign.errors import ConfigError
from safealign.eval.coherence import LMCoherenceScorer
from safealign.eval.eval_sets import check_prompts
from safealign.eval.rows import score_generations
from safealign.eval.table import interval_notes, log_to_loggers, run_notes, write_outputs
from safealign.generation import SamplingConfig, check_sampling, generate
from safealign.io import write_jsonl
from safealign.utils import check_required, record_run, resolved_config, setup_logging

log = logging.getLogger("safealign.eval")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_n_boot(n_boot) -> int:
    """``n_boot`` (bootstrap replicates of the 95% intervals of means) as an int >= 1."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError("n_boot", f"bootstrap replicates must be an integer >= 1, got {n_boot!r}")
    return n_boot


def resolve_model_dir(path: str | Path, key: str = "models") -> Path:
    """The exported model dir behind ``path`` (itself, or ``path/model`` for a run dir)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(key, f"{p} does not exist (expected a model dir or a run dir)")
    if (p / "model").is_dir():
        p = p / "model"
    if not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
        raise ConfigError(key, f"{p} holds no exported model (config.json + *.safetensors)")
    return p


def load_model_dir(path: str | Path, key: str = "models"):
    """Load ``(model, tokenizer)`` from a model dir or a run dir (local files, safetensors only)."""
    from safealign.models import load_causal_lm, load_tokenizer

    p = resolve_model_dir(path, key)
    tokenizer = load_tokenizer(str(p), local_files_only=True)
    return load_causal_lm(tokenizer, str(p), local_files_only=True), tokenizer


def model_dirs(models: dict | list | DictConfig, key: str = "models") -> dict[str, Path]:
    """Name -> model dir, validated. A list is named by run-dir names (``x`` for ``x/model``);
    null entries of a dict are unset slots (``conf/evaluate.yaml`` pre-declares method names)."""
    if isinstance(models, DictConfig) or OmegaConf.is_list(models):
        models = OmegaConf.to_container(models, resolve=True)
    if isinstance(models, list | tuple):
        named: dict[str, str] = {}
        for m in models:
            p = Path(m)
            base = p.parent.name if p.name == "model" else p.name
            name, n = base, 2
            while name in named:
                name, n = f"{base}_{n}", n + 1
            named[name] = m
        models = named
    if not isinstance(models, dict):
        raise ConfigError(key, f"expected a dict name -> path or a list of paths, got {models!r}")
    models = {str(k): v for k, v in models.items() if v is not None}
    if not models:
        raise ConfigError(key, "give at least one model, e.g. models.sft=PATH")
    for name in models:
        if not _NAME.match(name):
            raise ConfigError(f"{key}.{name}", "model names may use letters, digits, _ . - only")
    return {name: resolve_model_dir(p, f"{key}.{name}") for name, p in models.items()}


def lm_coherence_scorer(path: str | Path, direction: str = "forward", **kwargs):
    """``scorer/coherence=lm``: an :class:`LMCoherenceScorer` over a local model or run dir."""
    model, tok = load_model_dir(path, "scorer.coherence.path")
    return LMCoherenceScorer(model, tok, direction=direction, **kwargs)


def _lm_scorers(scorer_lm: str | Path | None) -> dict:
    if scorer_lm is None:
        return {}
    model, tok = load_model_dir(scorer_lm, "scorer_lm")
    # F-PPL = PPL(r | u), B-PPL = PPL(u | r) (docs/methods.md B.7)
    return {"f": LMCoherenceScorer(model, tok, direction="forward"),
            "b": LMCoherenceScorer(model, tok, direction="backward")}  # fmt: skip


def evaluate_models(
    models: dict[str, str | Path],
    prompts: list[dict],
    *,
    scorers: dict,
    sampling: SamplingConfig,
    seed: int,
    out_dir: Path,
    scorer_lm: str | None = None,
    threshold: float = 0.5,
    n_boot: int = 1000,
    progress: bool = False,
    notes: list[str] | None = None,
    device: str = "cpu",
) -> list[dict]:
    """Generate with every model on ``prompts``, score, and write one table across models.

    Everything is validated (model dirs, scorer LM, prompts, sampling, scorers) before the first
    model is loaded. Writes atomically into ``out_dir``: ``generations/<name>.jsonl`` (resumable),
    ``scored/<name>.jsonl``, ``table.md``, ``table.csv``, ``table.json`` and ``bars.png``.
    Intervals of means: ``n_boot`` bootstrap replicates seeded by ``seed``; sampled on ``device``.

    Returns:
        One row per model: ``model`` + the metrics of :func:`score_generations` (None = n/a).
    """
    dirs = model_dirs(models)
    lm_dir = None if scorer_lm is None else resolve_model_dir(scorer_lm, "scorer_lm")
    prompts, n_boot = check_prompts(prompts), check_n_boot(n_boot)
    sampling = replace(sampling, temperatures=check_sampling(sampling), toxic=False)
    for key in ("toxicity", "evasiveness"):
        if scorers.get(key) is None:
            raise ConfigError(f"scorer.{key}", "required scorer is missing")
    out_dir = Path(out_dir)
    lm_scorers = _lm_scorers(lm_dir)
    texts = [p["prompt"] for p in prompts]
    table = []
    for name, path in dirs.items():
        log.info("evaluating %s (%s) on %d prompts", name, path, len(prompts))
        model, tokenizer = load_model_dir(path, f"models.{name}")
        rows = generate(model.to(device), tokenizer, texts, sampling, seed,
                        out_path=out_dir / "generations" / f"{name}.jsonl", progress=progress)  # fmt: skip
        del model  # one model in memory at a time
        gc.collect()
        metrics, scored = score_generations(rows, prompts, scorers, threshold, lm_scorers,
                                            n_boot=n_boot, seed=seed)  # fmt: skip
        write_jsonl(out_dir / "scored" / f"{name}.jsonl", scored)
        table.append({"model": name} | metrics)
    notes = [*(notes or []), *run_notes(scorers, lm_dir, sampling, threshold)]
    write_outputs(out_dir, table, [*notes, *interval_notes(table, n_boot, seed)])
    return table


def _sampling(cfg: DictConfig) -> SamplingConfig:
    g = OmegaConf.to_container(cfg, resolve=True)
    return SamplingConfig(**(g | {"temperatures": tuple(g.get("temperatures", (1.0,)))}))


def _eval_set_name(cfg: DictConfig) -> str:
    name = cfg.eval_set._target_.rsplit(".", 1)[-1]
    return f"{name} {cfg.eval_set.path}" if "path" in cfg.eval_set else name


def evaluate(cfg: DictConfig) -> list[dict]:
    """Hydra task (``evaluate.py``): check everything, evaluate, log the markdown table."""
    setup_logging()
    check_required(cfg)
    dirs = model_dirs(cfg.models)  # fails on a missing model before any data or scorer loads
    n_boot = check_n_boot(cfg.get("n_boot", 1000))
    out_dir = Path(cfg.paths.output_dir)
    OmegaConf.resolve(cfg.paths)
    prompts = check_prompts(instantiate(cfg.eval_set), "eval_set")
    if cfg.get("max_prompts") is not None:
        prompts = prompts[: int(cfg.max_prompts)]
    scorers = {k: instantiate(v) for k, v in cfg.scorer.items() if v is not None}
    record_run(cfg, out_dir)
    table = evaluate_models(
        dirs, prompts, scorers=scorers, sampling=_sampling(cfg.generation), seed=cfg.seed,
        out_dir=out_dir, scorer_lm=cfg.get("scorer_lm"), threshold=cfg.threshold,
        n_boot=n_boot, progress=cfg.progress,
        notes=[f"eval set: {_eval_set_name(cfg)} ({len(prompts)} prompts)"],
    )  # fmt: skip
    log_to_loggers(cfg.get("trainer", {}).get("logger"), table, resolved_config(cfg))
    log.info("%s\noutputs: %s", (out_dir / "table.md").read_text(encoding="utf-8"), out_dir)
    return table
