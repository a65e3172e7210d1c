"""Evaluate entry point: `python evaluate.py models.sft=PATH models.dpo=PATH [eval_set=...]`,
or score existing generations without a model: `python evaluate.py generations=FILE.jsonl`."""

import hydra
from omegaconf import DictConfig

from safealign.cli import run_task
from safealign.eval.evaluate import evaluate
from safealign.eval.score_file import score_file
from safealign.validate import validate_config


def validated_evaluate(cfg: DictConfig) -> list[dict]:
    validate_config(cfg)  # sampling ranges (temperatures, top_p, ...) before any model loads
    if cfg.get("generations") is not None:  # score a file: no model, no generation
        return score_file(cfg)
    return evaluate(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> list[dict]:
    return run_task(validated_evaluate, cfg)


if __name__ == "__main__":
    main()
