"""The ISAAC row of `make demo` (issue 5 item 9): a plain SFT model vs ISAAC, both trained on the
same built-in corpus (no labels used), compared on the safety score (docs/methods.md B.7: 1 − unsafe
fraction) of their generations on the corpus' test split. Every step is an artefact-store stage.
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from safealign.io import read_json, write_json
from safealign.pipeline.adpo_stages import prompt_sets, sampling_config
from safealign.pipeline.stages import StageRunner, stage_config, stage_key
from safealign.pipeline.summary import write_isaac_summary

MODELS = {"SFT_raw_corpus": "isaac_base", "ISAAC": "isaac"}  # table row -> its training stage


def run_isaac_demo(cfg: DictConfig, node: DictConfig) -> list[dict]:
    """Train (or reuse) both models, evaluate (or reuse); log and return the two rows.

    Args:
        cfg: the run config the stages derive from (the ``isaac_demo`` node taken out).
        node: ``isaac_demo``: ``isaac_base`` and ``isaac`` stage overrides, ``max_prompts``.
    """
    ev = cfg.pipeline.evaluate
    runner = StageRunner(cfg)
    dirs = {name: runner.fit(stage, stage_config(cfg, node[stage])) for name, stage in MODELS.items()}
    key = {
        "models": {n: d.name for n, d in dirs.items()},
        "evaluate": OmegaConf.to_container(ev, resolve=True),
        "max_prompts": node.max_prompts,
        "corpus": stage_key(stage_config(cfg, node.isaac))["data"]["source"],
        "seed": cfg.seed,
    }

    def evaluate(tmp: Path) -> None:
        from safealign.eval.evaluate import evaluate_models

        _, prompts = prompt_sets(node.isaac.data.source, 1, node.max_prompts)
        rows = evaluate_models(
            {n: d / "model" for n, d in dirs.items()}, prompts,
            scorers={k: instantiate(v) for k, v in ev.scorers.items() if v is not None},
            sampling=sampling_config(ev.sampling), seed=cfg.seed, out_dir=tmp,
            threshold=ev.threshold,
        )  # fmt: skip
        write_json(tmp / "rows.json", rows)

    rows = read_json(runner.run("isaac_eval", key, evaluate) / "rows.json")
    write_isaac_summary(Path(cfg.paths.output_dir), rows, runner.statuses, cfg.seed)
    return rows
