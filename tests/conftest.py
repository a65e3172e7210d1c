"""Shared fixtures: offline, CPU, tiny models built from configs, fixtures written by the tests."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models on a 2-core machine: one intra-op thread is several times faster than two
# (thread hand-off dominates such small matmuls) and keeps timings stable.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA

CONF_DIR = str(ROOT / "conf")

# Small and fast everywhere: a 200-dialogue corpus, a 2-layer 32-d GPT-2, a 256-token BPE.
TINY = [
    "model.lm.n_embd=32",
    "model.lm.n_head=2",
    "model.tokenizer.vocab_size=300",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]


def compose_cfg(overrides: list[str], tmp_path: Path):
    """Compose conf/train.yaml like `python train.py` would, with outputs under tmp_path."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        cfg.paths.artifacts_dir = str(tmp_path / "artifacts")
        del cfg.hydra
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides: str, tiny: bool = True):
        return compose_cfg((TINY if tiny else []) + list(overrides), tmp_path)

    return make


# The texts a tiny BPE tokenizer is trained on in the log-prob tests (test_logps, test_shared_prompt).
BPE_SENTENCES = [
    "How do I bake bread at home?",
    "Mix flour, water and yeast, then bake it for forty minutes.",
    "What is the capital of France? Paris is the capital of France.",
    "I will not help you with that, go away.",
    "Keep a regular schedule and avoid screens late at night.",
]
