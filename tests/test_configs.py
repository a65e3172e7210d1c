"""Every config option composes and its data/method/trainer nodes instantiate (template pattern)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from safealign.errors import ConfigError
from safealign.utils import check_required

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_composes(make_cfg, experiment):
    cfg = make_cfg(f"experiment={experiment}", tiny=False)  # experiments may pick their own model
    assert cfg.seed == 0
    assert "_target_" in cfg.method and "_target_" in cfg.data


@pytest.mark.parametrize("method", options("method"))
def test_method_instantiates(make_cfg, method):
    cfg = make_cfg(f"method={method}")
    factory = instantiate(cfg.method)
    assert callable(factory)  # a partial awaiting model_factory and tokenizer


@pytest.mark.parametrize("trainer", ["cpu", "debug"])
def test_trainer_instantiates(make_cfg, trainer):
    cfg = make_cfg(f"trainer={trainer}")
    t = instantiate(cfg.trainer)
    assert t.max_epochs == cfg.trainer.max_epochs or trainer == "debug"


@pytest.mark.parametrize("group", ["strategy", "logger", "launcher", "model", "data"])
def test_every_option_composes(make_cfg, group):
    for option in options(group):
        extra = []
        if group == "model" and option == "hf":
            extra = ["model.name_or_path=/nonexistent"]
        cfg = make_cfg(f"{group}={option}", *extra, tiny=group != "model")
        assert cfg is not None


def test_missing_required_value_fails_fast(make_cfg):
    cfg = make_cfg("data=hh_rlhf")
    with pytest.raises(ConfigError, match="data.source.path"):
        check_required(cfg)


def test_unknown_option_is_rejected(make_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        make_cfg("method=no_such_method")
