"""Stage bodies of the ADPO pipeline (safealign/pipeline/adpo.py): each writes its outputs into
the work dir the artefact store hands it, which becomes the stage dir only when complete."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from safealign.errors import ConfigError
from safealign.generation import SamplingConfig, generate, summarize
from safealign.io import write_json, write_jsonl

log = logging.getLogger("safealign.pipeline")
GENERATIONS, TRIPLES = "generations.jsonl", "triples.jsonl"
EVAL_SETTINGS = "eval_settings.json"
# In the evaluate stage's cache key: bump whenever the stage's outputs change, so stored stages
# are recomputed (2: rows with 95% intervals, scored samples + eval_settings.json for pooling).
EVALUATE_VERSION = 2


def sampling_config(node: DictConfig) -> SamplingConfig:
    s = instantiate(node, _convert_="all")
    return dataclasses.replace(s, temperatures=tuple(float(t) for t in s.temperatures))


def prompt_sets(source: DictConfig, max_train: int, max_test: int) -> tuple[list[str], list[dict]]:
    """Distinct contexts of the SFT corpus: train prompts for generation (A.2 step 1) and held-out
    test prompt rows for evaluation (A.5), each capped, in the corpus' own seeded order."""
    corpus = instantiate(source)()

    def distinct(records) -> list:
        seen: dict[str, object] = {}
        for r in records:
            seen.setdefault(r.context, r)
        return list(seen.values())

    train = [r.context for r in distinct(corpus.train)][:max_train]
    test = distinct(corpus.test or corpus.val)[:max_test]
    if not train or not test:
        raise ConfigError("init.data.source", "the SFT corpus needs train and test (or val) rows")
    rows = [
        {"prompt": r.context, "reference": r.response, "reference_label": r.label} for r in test
    ]
    return train, rows


def _load(model_dir: Path):
    from safealign.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir), local_files_only=True)
    return load_causal_lm(tokenizer, str(model_dir)), tokenizer


def generate_stage(model_dir: Path, prompts: list[str], normal, toxic, seed: int, tmp: Path):
    """Normal candidates and the [TOXIC] sample for every prompt, one JSONL (A.2 steps 2-3)."""
    model, tokenizer = _load(model_dir)
    rows = generate(model, tokenizer, prompts, normal, seed, progress=False)
    rows += generate(model, tokenizer, prompts, toxic, seed, progress=False)
    write_json(
        tmp / "summary.json",
        {
            "normal": summarize([r for r in rows if not r["toxic"]]),
            "toxic": summarize([r for r in rows if r["toxic"]]),
        },
    )
    write_jsonl(tmp / GENERATIONS, rows)


def judge_stage(judge_cfg: DictConfig, generations: Path, tmp: Path) -> None:
    """Annotate the generations into triples; stats and per-prompt records beside them (A.2)."""
    from safealign.annotate.rows import save_judgements

    rows = [json.loads(line) for line in generations.read_text(encoding="utf-8").splitlines()]
    judge = instantiate(judge_cfg)
    triples, stats = judge.annotate(rows)
    log.info(
        "judge: kept %d of %d prompts; dropped %s; labels %s",
        stats["kept"],
        stats["prompts"],
        {k: v for k, v in stats["dropped"].items() if v},
        stats["labels"],
    )
    if len(triples) < 2:
        raise ConfigError(
            "pipeline.judge",
            f"only {len(triples)} triples survived judging: "
            f"{stats['dropped']} (more prompts, or a better SFT model)",
        )
    save_judgements(tmp / TRIPLES, triples, stats, judge.records)


def evaluate_stage(
    name: str, model_dir: Path, prompts: list[dict], ev: DictConfig, seed: int, tmp: Path
) -> None:
    """One model sampled on the test prompts and scored (A.5): ``row.json`` (its table row with
    95% intervals), ``scored/<name>.jsonl`` (per-sample scores, pooled over seeds by the summary)
    and ``eval_settings.json`` (what the summary needs to reduce those samples the same way)."""
    from safealign.eval.evaluate import evaluate_models

    scorers = {k: instantiate(v) for k, v in ev.scorers.items() if v is not None}
    n_boot = int(ev.get("n_boot", 1000))  # bootstrap replicates of the 95% intervals of means
    rows = evaluate_models(
        {name: model_dir},
        prompts,
        scorers=scorers,
        sampling=sampling_config(ev.sampling),
        seed=seed,
        out_dir=tmp,
        scorer_lm=ev.get("scorer_lm"),
        threshold=ev.threshold,
        n_boot=n_boot,
    )
    settings = {"threshold": float(ev.threshold), "n_boot": n_boot, "seed": seed}
    write_json(tmp / EVAL_SETTINGS, settings | {"scored": f"scored/{name}.jsonl"})
    write_json(tmp / "row.json", rows[0])


def llm_judge(
    name_or_path: str,
    template: str | None,
    chat_template: bool = True,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    require_toxic: bool = True,
    randomize_order: bool = True,
    seed: int = 0,
):
    """``judge=llm``: an LLMJudge over a local chat model (greedy replies, docs/methods.md A.2)."""
    from safealign.annotate.hf import hf_generate_fn
    from safealign.annotate.llm import LLMJudge

    model, tokenizer = _load(Path(name_or_path))
    fn = hf_generate_fn(model, tokenizer, max_new_tokens, batch_size, chat_template)
    return LLMJudge(fn, template, require_toxic, randomize_order, seed)
