"""The ISAAC row of `make demo` (issue 5 item 9): a plain SFT model vs ISAAC, both trained on the
same built-in corpus (no labels used), compared on the safety score (METHODS.md B.7: 1 − unsafe
fraction) of their generations on the corpus' test split. Every step is an artefact-store stage.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from safealign.io import read_json, write_json
from safealign.pipeline.adpo_stages import prompt_sets, sampling_config
from safealign.pipeline.stages import run_fit_stage, stage_config, stage_key
from safealign.pipeline.store import ArtifactStore

log = logging.getLogger("safealign.pipeline")
COLUMNS = ("safety_score", "toxicity_rate", "evasiveness_rate", "coherence")


def run_isaac_demo(cfg: DictConfig) -> list[dict]:
    """Train (or reuse) both models, evaluate (or reuse), print and return the two rows."""
    node, ev = cfg.isaac_demo, cfg.pipeline.evaluate
    dirs, statuses = {}, {}
    for name, stage in (("SFT_raw_corpus", "isaac_base"), ("ISAAC", "isaac")):
        dirs[name], statuses[stage] = run_fit_stage(cfg, stage, stage_config(cfg, node[stage]))
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
        )
        write_json(tmp / "rows.json", rows)

    out, statuses["isaac_eval"] = ArtifactStore(cfg.paths.artifacts_dir).get_or_compute(
        "isaac_eval", key, evaluate
    )
    rows = read_json(out / "rows.json")
    for stage, status in statuses.items():
        print(f"stage {stage:<12} {status}", flush=True)
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {r['model']} | " + " | ".join(f"{r[c]:.3f}" for c in COLUMNS) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(f"\nISAAC vs SFT on the built-in test split (seed {cfg.seed}):\n{text}", flush=True)
    write_json(Path(cfg.paths.output_dir) / "isaac_results.json", {"rows": rows, "statuses": statuses})
    return rows
