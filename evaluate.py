"""Evaluate entry point: `python evaluate.py models.sft=PATH models.dpo=PATH [eval_set=...]`."""

import hydra
from omegaconf import DictConfig

from safealign.cli import run_task
from safealign.eval.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> list[dict]:
    return run_task(evaluate, cfg)


if __name__ == "__main__":
    main()
