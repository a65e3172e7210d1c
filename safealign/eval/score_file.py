"""Score existing generations: ``python evaluate.py generations=FILE.jsonl`` (issue 11 item 4).

Scores rows ``{"context": str, "response": str, "model"?: str}`` written by anything (another
framework, an external system, an API) with the SAME scorers as the generate-and-score path
(``scorer/*`` in ``conf/evaluate.yaml``); no model is loaded and nothing is generated. Rows are
grouped by ``model`` (default: the file's stem); within a model, rows with the same ``context``
are the samples of one prompt. Each model is reduced by the same code as ``evaluate.py``
(:func:`safealign.eval.rows.score_generations`): the same metrics, the same 95% intervals
(``n_boot`` bootstrap replicates seeded by ``seed``), the same table writer.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from safealign.data.readers import existing_file, kind_of, read_jsonl
from safealign.errors import ConfigError, DataError
from safealign.eval.evaluate import check_n_boot
from safealign.eval.rows import score_generations
from safealign.eval.table import interval_notes, log_to_loggers, write_outputs
from safealign.utils import check_required, record_run, resolved_config, setup_logging

log = logging.getLogger("safealign.eval")


def read_generations(path: str | Path) -> dict[str, list[dict]]:
    """Rows of a generations JSONL grouped by ``model`` (first-seen order), all checked first.

    Raises:
        DataError: naming the file and line of a row without a string ``context``/``response``
            or with a ``model`` that is not a non-empty string.
    """
    p = existing_file(path)
    default = p.name.split(".")[0] or "generations"
    groups: dict[str, list[dict]] = {}
    for line, row in read_jsonl(p):
        for key in ("context", "response"):
            if key not in row:
                raise DataError(p, f"missing field {key!r} (rows are {{context, response, model?}})",
                                line)  # fmt: skip
            if not isinstance(row[key], str):
                raise DataError(p, f"field {key!r} must be a string, got {kind_of(row[key])}", line)
        model = row.get("model", default)
        if not isinstance(model, str) or not model.strip():
            raise DataError(p, f"field 'model' must be a non-empty string, got {model!r}", line)
        groups.setdefault(model, []).append(
            {"context": row["context"], "response": row["response"], "line": line}
        )
    return groups


def score_rows(rows: list[dict], scorers: dict, *, threshold: float = 0.5, n_boot: int = 1000,
               seed: int = 0) -> dict:  # fmt: skip
    """One model's flat table row (:func:`safealign.eval.rows.score_generations`; None = n/a):
    the distinct contexts are its prompts, in first-seen order."""
    ids: dict[str, int] = {}
    gens = [{"prompt_id": ids.setdefault(r["context"], len(ids)), "response": r["response"]}
            for r in rows]  # fmt: skip
    prompts = [{"prompt": c} for c in ids]
    row, _ = score_generations(gens, prompts, scorers, threshold, n_boot=n_boot, seed=seed)
    return row


def _notes(path: Path, scorers: dict, threshold: float) -> list[str]:
    def name(key: str) -> str | None:
        s = scorers.get(key)
        return None if s is None else getattr(s, "name", type(s).__name__)

    return [
        f"generations: {path} (scored as given; no model was run)",
        f"toxicity scorer: {name('toxicity')} (unsafe = score >= {threshold}); evasiveness "
        f"scorer: {name('evasiveness')}; coherence scorer: {name('coherence')}",
        "empty responses are counted (n_empty, empty_rate) and excluded from the other metrics",
    ]


def score_file(cfg: DictConfig) -> list[dict]:
    """Hydra task behind ``evaluate.py generations=FILE``: check the file, score, write, log."""
    setup_logging()
    check_required(cfg)
    path = existing_file(cfg.generations)
    groups = read_generations(path)  # every row checked before any scorer loads
    n_boot, threshold = check_n_boot(cfg.get("n_boot", 1000)), float(cfg.threshold)
    out_dir = Path(cfg.paths.output_dir)
    OmegaConf.resolve(cfg.paths)
    scorers = {k: instantiate(v) for k, v in cfg.scorer.items() if v is not None}
    for key in ("toxicity", "evasiveness"):
        if scorers.get(key) is None:
            raise ConfigError(f"scorer.{key}", "required scorer is missing")
    record_run(cfg, out_dir)
    table = []
    for name, rows in groups.items():
        log.info("scoring %d generations of %s from %s", len(rows), name, path)
        scored = score_rows(rows, scorers, threshold=threshold, n_boot=n_boot, seed=cfg.seed)
        table.append({"model": name} | scored)
    notes = [*_notes(path, scorers, threshold), *interval_notes(table, n_boot, cfg.seed)]
    write_outputs(out_dir, table, notes, stem="results")
    log_to_loggers(cfg.get("trainer", {}).get("logger"), table, resolved_config(cfg))
    log.info("%s\noutputs: %s", (out_dir / "results.md").read_text(encoding="utf-8"), out_dir)
    return table
