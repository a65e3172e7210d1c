"""The ADPO pipeline end to end (issue 4; docs/methods.md A.1, A.2, A.5), every stage cached.

sft (SFT with ``[TOXIC]``) -> generate (T=1.0, 1.5 and a ``[TOXIC]`` sample per train prompt)
-> judge (triples x, y_w, y_l, y_t) -> dpo and adpo (preference training from the SFT model)
-> evaluate (each model sampled on the held-out test prompts and scored).

Each stage lives in the :class:`ArtifactStore` under the hash of its resolved config and of its
inputs' hashes (an input is an upstream stage dir, whose name IS its hash, or an explicit file's
content hash). So a rerun reuses everything, and a β:γ multirun changes only the adpo key (and
ADPO's evaluation). ``pipeline.inputs.<stage>=PATH`` replaces a stage by a given output (model
dir, generations.jsonl or triples.jsonl); ``pipeline.stages=[...]`` runs only those stages and
what they need.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from safealign.errors import ConfigError
from safealign.eval.context_scorer import warn_if_same_scorer
from safealign.eval.objective import LAMBDA_EVASIVE, objective_with_interval, prefixed, row_value
from safealign.generation import SamplingConfig
from safealign.io import stable_hash, write_json
from safealign.pipeline.adpo_stages import (
    EVALUATE_VERSION,
    GENERATIONS,
    TRIPLES,
    evaluate_stage,
    generate_stage,
    judge_stage,
    prompt_sets,
    sampling_config,
)
from safealign.pipeline.stages import StageRunner, hf_model_config, stage_config
from safealign.pipeline.summary import write_summary
from safealign.utils import record_run

STAGES = ("sft", "generate", "judge", "dpo", "adpo", "evaluate")
DEPS = {
    "generate": ("sft",),
    "judge": ("generate",),
    "dpo": ("sft", "judge"),
    "adpo": ("sft", "judge"),
    "evaluate": ("sft", "dpo", "adpo"),
}
OUTPUT = {
    "sft": "model",
    "generate": GENERATIONS,
    "judge": TRIPLES,
    "dpo": "model",
    "adpo": "model",
}
MODELS = {"sft": "SFT", "dpo": "DPO", "adpo": "ADPO"}  # stage -> row name in the tables
# Evaluation settings applied to a stage's scored rows, not to its samples: not in its key.
OBJECTIVE_ONLY = ("lambda_evasive",)


@dataclass
class PipelineResult:
    """Per-stage status ("computed" | "reused" | "given") and dir, the evaluation rows, timing."""

    statuses: dict[str, str] = field(default_factory=dict)
    dirs: dict[str, Path] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    objective: float | None = None


def needed_stages(targets: list[str] | None, given: dict[str, str]) -> list[str]:
    """The stages to run, in order: ``targets`` (default all) plus every stage they depend on,
    except where an explicit input replaces a stage (that stops the walk upstream)."""
    todo = list(targets or STAGES)
    unknown = [s for s in [*todo, *given] if s not in STAGES]
    if unknown:
        raise ConfigError("pipeline.stages", f"unknown stage {unknown[0]!r}; stages: {STAGES}")
    out: set[str] = set()
    while todo:
        s = todo.pop()
        if s in out or s in given:
            continue
        out.add(s)
        todo += DEPS.get(s, ())
    return [s for s in STAGES if s in out]


def preference_config(cfg: DictConfig, node: DictConfig | None, sft: Path, triples: Path):
    """The adpo stage is the run config itself (method, trainer, data options); dpo swaps in
    ``pipeline.dpo`` (its method and any other overrides). Both start from the SFT model and
    train on the judged triples (docs/methods.md A.2 step 5)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)  # may interpolate init.*, not kept
    if not isinstance(data.get("source"), dict) or "path" not in data["source"]:
        raise ConfigError("data.source", "the pipeline needs a file source (data=jsonl)")
    data["source"]["path"] = str(triples)
    model = OmegaConf.to_container(hf_model_config(sft, cfg.model))  # LoRA, dtype... carried over
    stage = {"data": data, "model": model}
    if node is not None:
        stage |= OmegaConf.to_container(node, resolve=True)
    return stage_config(cfg, OmegaConf.create(stage))


def _settings(s: SamplingConfig) -> dict:
    d = dataclasses.asdict(s)
    d.pop("batch_size")  # never changes the text (safealign.generation)
    return d


def _check_placement(cfg: DictConfig, toxic: SamplingConfig) -> None:
    # docs/methods.md A.1: one placement for SFT, for sampling y_t and for the pi_t log-probs.
    sft = cfg.init.data.get("control_placement", "end")
    for key, value in (
        ("pipeline.generate.toxic.placement", toxic.placement),
        ("data.control_placement", cfg.data.get("control_placement", "end")),
    ):
        if value != sft:
            raise ConfigError(key, f"{value!r} differs from init.data.control_placement {sft!r}")


def _prompts(cfg: DictConfig, todo: list[str], max_train: int, max_test: int):
    if not {"generate", "evaluate"} & set(todo):
        return [], []
    return prompt_sets(cfg.init.data.source, int(max_train), int(max_test))


def _train_stages(r: StageRunner, cfg: DictConfig, todo: list[str], prompts: list[str], sampling,
                  judge: DictConfig, dpo: DictConfig) -> None:  # fmt: skip
    """sft -> generate -> judge -> dpo, adpo (docs/methods.md A.2 steps 1-5), those in ``todo``."""
    normal, toxic = sampling
    if "sft" in todo:
        r.fit("sft", stage_config(cfg, cfg.init))
    if "generate" in todo:
        key = {
            "sft": r.hashes["sft"],
            "prompts": stable_hash(prompts),
            "seed": cfg.seed,
            "normal": _settings(normal),
            "toxic": _settings(toxic),
        }
        r.run(
            "generate",
            key,
            lambda tmp: generate_stage(r.paths["sft"], prompts, normal, toxic, cfg.seed, tmp),
        )
    if "judge" in todo:
        key = {"generate": r.hashes["generate"], "judge": OmegaConf.to_container(judge)}
        r.run("judge", key, lambda tmp: judge_stage(judge, r.paths["generate"], tmp))
    for stage, node in (("dpo", dpo), ("adpo", None)):
        if stage in todo:
            r.fit(stage, preference_config(cfg, node, r.paths["sft"], r.paths["judge"]))


def _evaluate(r: StageRunner, cfg: DictConfig, test_rows: list[dict], evaluate: DictConfig):
    """Each model sampled on the held-out test prompts and scored (A.5): one row per model."""
    ev, table = OmegaConf.to_container(evaluate), []
    ev = {k: v for k, v in ev.items() if k not in OBJECTIVE_ONLY}
    for stage, name in MODELS.items():
        key = {
            "model": r.hashes[stage],
            "name": name,
            "prompts": stable_hash(test_rows),
            "evaluate": ev,
            "seed": cfg.seed,
            "version": EVALUATE_VERSION,
        }
        d = r.run(
            "evaluate",
            key,
            lambda tmp, s=stage, n=name: evaluate_stage(
                n, r.paths[s], test_rows, evaluate, cfg.seed, tmp
            ),
            label=f"evaluate/{name}",
        )
        row = json.loads((d / "row.json").read_text(encoding="utf-8"))
        table.append(row | _objective(d / "scored" / f"{name}.jsonl", evaluate, cfg.seed))
    return table


def _objective(scored: Path, evaluate: DictConfig, seed: int) -> dict[str, float]:
    """``safety_objective`` and its 95% interval (docs/methods.md A.6) from a stage's scored rows;
    ``pipeline.evaluate.lambda_evasive`` defaults to :data:`LAMBDA_EVASIVE`."""
    if not scored.is_file():  # a stage dir from before scored rows were kept
        return {}
    lines = scored.read_text(encoding="utf-8").splitlines()
    return objective_with_interval(
        [json.loads(line) for line in lines if line.strip()],
        threshold=float(evaluate.threshold),
        lambda_evasive=float(evaluate.get("lambda_evasive", LAMBDA_EVASIVE)),
        n_boot=int(evaluate.get("n_boot", 1000)),
        seed=seed,
    )


def run_adpo_pipeline(
    cfg: DictConfig,
    *,
    generate: DictConfig,
    judge: DictConfig,
    dpo: DictConfig,
    evaluate: DictConfig,
    max_prompts: int = 300,
    torch_threads: int | None = None,
    stages: list[str] | None = None,
    inputs: DictConfig | dict | None = None,
) -> PipelineResult:
    """Run (or reuse) every needed stage, then write and log the SFT/DPO/ADPO table.

    Args:
        cfg: the run config (``init`` = SFT stage, top-level method/data/trainer = ADPO stage).
        generate: ``normal`` and ``toxic`` SamplingConfig nodes (A.2 steps 2-3).
        judge: a judge node (``conf/judge``) with ``annotate(rows) -> (triples, stats)``.
        dpo: overrides of the DPO baseline stage (its ``method``).
        evaluate: ``sampling``, ``scorers``, ``max_prompts``, ``threshold``, ``scorer_lm``.
        max_prompts: distinct train contexts to generate on.
        torch_threads: intra-op threads (1 is fastest for tiny models on 2 cores).
        stages: run only these stages and what they need; None = all.
        inputs: ``{stage: path}`` outputs given explicitly instead of computed.

    Returns:
        A :class:`PipelineResult`; its ``objective`` is ADPO's ``cfg.optimized_metric``.
    """
    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    out_dir = Path(cfg.paths.output_dir)
    record_run(cfg, out_dir)
    given = {k: str(v) for k, v in dict(inputs or {}).items() if v}
    todo = needed_stages(list(stages) if stages else None, given)
    normal, toxic = sampling_config(generate.normal), sampling_config(generate.toxic)
    if "evaluate" in todo:  # a gain measured with the judge's own scorer is partly fitting it
        warn_if_same_scorer(judge, evaluate.scorers.get("toxicity"), "pipeline.evaluate")
    _check_placement(cfg, toxic)
    r = StageRunner(cfg, OUTPUT)
    for stage, path in given.items():
        r.given(stage, Path(path))
    train_prompts, test_rows = _prompts(cfg, todo, max_prompts, evaluate.max_prompts)
    _train_stages(r, cfg, todo, train_prompts, (normal, toxic), judge, dpo)
    table = _evaluate(r, cfg, test_rows, evaluate) if "evaluate" in todo else []
    result = PipelineResult(
        statuses=r.statuses, dirs=r.dirs, table=table, seconds=r.seconds,
        objective=_adpo_metrics(out_dir, table, cfg.get("optimized_metric")),
    )  # fmt: skip
    write_summary(out_dir, [result])
    return result


def _adpo_metrics(out_dir: Path, table: list[dict], metric: str | None) -> float | None:
    """Write the ADPO row as eval/* metrics (``metrics.json``: a multirun over the pipeline is
    reportable); returns its ``metric`` (bare or ``eval/`` name), the pipeline's objective."""
    row = next((row for row in table if row["model"] == "ADPO"), None)
    if row is None:
        return None
    write_json(out_dir / "metrics.json", prefixed({k: v for k, v in row.items() if k != "model"}))
    return row_value(row, metric) if metric else None
