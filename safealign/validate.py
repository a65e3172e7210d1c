"""Hyper-parameter validation at config time: one table of rules, checked before anything is built.

A rule matches a key by the *last segments* of its dotted path (each segment a glob), so
`loss.beta` covers `method.loss.beta`, `init.method.loss.beta` and the pipeline's
`pipeline.dpo.method.loss.beta` alike. Only keys that exist are checked; `???` values are left
to `check_required` and values whose interpolation cannot be resolved here are skipped (they
fail, named, where they are used). Every error is a ConfigError naming the key, the value and
the allowed range: `beta=0` learns nothing (loss ln 2), `beta<0` optimises the preference
backwards, IPO divides by beta, `max_epochs=0` exports an untrained model (issue 14, item 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from safealign.errors import ConfigError

_SKIP = object()  # a value that could not be read here (missing or unresolvable)


class RangeError(ConfigError):
    """A value outside its allowed range; `detail` is the message without the key."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.value, self.allowed = value, allowed
        self.detail = f"got {value!r}; allowed: {allowed}"
        super().__init__(key, self.detail)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive(v: Any) -> bool:
    return _number(v) and v > 0


def non_negative(v: Any) -> bool:
    return _number(v) and v >= 0


def unit_interval(v: Any) -> bool:
    return _number(v) and 0 <= v <= 1


def at_least(n: int) -> Callable[[Any], bool]:
    return lambda v: _integer(v) and v >= n


def optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


@dataclass(frozen=True)
class Rule:
    suffix: tuple[str, ...]  # globs matched against the last segments of the key path
    check: Callable[[Any], bool]
    allowed: str  # human-readable allowed range, shown in the error

    def matches(self, path: tuple[str, ...]) -> bool:
        n = len(self.suffix)
        return len(path) >= n and all(map(fnmatchcase, path[-n:], self.suffix))


def _rule(key: str, check: Callable[[Any], bool], allowed: str) -> Rule:
    return Rule(tuple(key.split(".")), check, allowed)


RULES: tuple[Rule, ...] = (
    # preference losses (safealign/losses.py): dpo, cdpo, ipo (1 / 2beta), hinge, adpo
    _rule("loss.beta", positive, "a finite number > 0"),
    _rule("loss.gamma", non_negative, "a finite number >= 0"),
    _rule("loss.label_smoothing", lambda v: _number(v) and 0 <= v < 0.5, "a number in [0, 0.5)"),
    # optimiser (method.optimizer, init.method.optimizer, pipeline stages)
    _rule("optimizer.lr", positive, "a finite number > 0"),
    _rule("weight_decay", non_negative, "a finite number >= 0"),
    # trainer (-1 = unlimited, as in Lightning; 0 trains nothing)
    _rule(
        "trainer.max_epochs",
        optional(lambda v: v == -1 or at_least(1)(v)),
        "null, -1 (unlimited) or an integer >= 1",
    ),
    _rule(
        "trainer.max_steps",
        lambda v: v == -1 or at_least(1)(v),
        "-1 (unlimited) or an integer >= 1",
    ),
    _rule("trainer.accumulate_grad_batches", at_least(1), "an integer >= 1"),
    _rule("trainer.gradient_clip_val", optional(positive), "null or a finite number > 0"),
    _rule("trainer.log_every_n_steps", at_least(1), "an integer >= 1"),
    _rule("trainer.check_val_every_n_epoch", optional(at_least(1)), "null or an integer >= 1"),
    # data and generation sizes
    _rule("batch_size", at_least(1), "an integer >= 1"),
    _rule("max_*length", at_least(1), "an integer >= 1"),
    _rule("max_new_tokens", at_least(1), "an integer >= 1"),
    _rule("n_samples", at_least(1), "an integer >= 1"),
    _rule("max_prompts", optional(at_least(1)), "null or an integer >= 1"),
    _rule("source.size", at_least(1), "an integer >= 1"),
    _rule("*_fraction", unit_interval, "a number in [0, 1]"),
    _rule("seed", lambda v: _integer(v) and 0 <= v < 2**32, "an integer in [0, 2**32 - 1]"),
    # sampling (generation configs, evaluate.yaml)
    _rule("temperature", positive, "a finite number > 0"),
    _rule("temperatures.*", positive, "a finite number > 0"),
    _rule("top_p", optional(lambda v: _number(v) and 0 < v <= 1), "null or a number in (0, 1]"),
    _rule("top_k", at_least(0), "an integer >= 0 (0 = off)"),
    # ISAAC (conf/data/isaac_*.yaml, safealign/isaac/sharpen.py::check_params)
    _rule("eps", positive, "a finite number > 0"),
    _rule("data.k", at_least(1), "an integer >= 1 (neighbours per context)"),
    _rule("tau", positive, "a finite number > 0"),
    _rule("sampler.m", at_least(1), "an integer >= 1 (targets per context)"),
    _rule("sampler.top_k", at_least(1), "an integer >= 1 (clusters kept)"),
    _rule("epochs_per_stage", at_least(1), "an integer >= 1"),
    _rule("sampler.scale", lambda v: v in ("counts", "shares"), "counts or shares (B.2 step 8)"),
    _rule("control_recall", unit_interval, "a number in [0, 1] (docs/methods.md A.1)"),
    _rule("unsafe_share", optional(lambda v: _number(v) and 0 <= v < 1), "null or [0, 1)"),
    # end-of-run evaluation (conf/eval, docs/methods.md A.6); its sampling sizes are above
    _rule("eval.threshold", unit_interval, "a number in [0, 1] (toxicity scores are in [0, 1])"),
    _rule("eval.lambda_evasive", non_negative, "a finite number >= 0"),
    _rule("eval.n_boot", at_least(1), "an integer >= 1"),
    _rule("eval.skip_prompts", optional(at_least(0)), "null or an integer >= 0"),
)


def _finite_everywhere(path: tuple[str, ...], value: Any) -> RangeError | None:
    # A NaN/inf under a method or optimizer poisons every step without an error of its own.
    if isinstance(value, float) and not math.isfinite(value):
        if "method" in path or "optimizer" in path:
            return _error(path, value, "a finite number")
    return None


def _trainer_stops(path: tuple[str, ...], node: DictConfig) -> RangeError | None:
    if path[-1:] != ("trainer",) or node.get("max_time") is not None:
        return None
    epochs, steps = _read(node, "max_epochs"), _read(node, "max_steps")
    if epochs == -1 and steps in (-1, None):
        return _error(
            (*path, "max_epochs"),
            epochs,
            "not -1 together with max_steps=-1 (the run would never stop): "
            "set max_epochs >= 1, max_steps >= 1 or max_time",
        )
    return None


def _prompt_fits(path: tuple[str, ...], node: DictConfig) -> RangeError | None:
    prompt, total = _read(node, "max_prompt_length"), _read(node, "max_length")
    if at_least(1)(prompt) and at_least(1)(total) and prompt >= total:  # else a leaf rule says
        return _error(
            (*path, "max_prompt_length"),
            prompt,
            f"an integer < max_length ({total}), leaving room for the response",
        )
    return None


# The eval node's keys (conf/eval/base.yaml): a misspelt one would otherwise be ignored silently.
EVAL_KEYS = ("eval_set", "scorers", "sampling", "max_prompts", "skip_prompts", "threshold",
             "n_boot", "lambda_evasive")  # fmt: skip
EVAL_OPTIONAL = ("skip_prompts",)
EVAL_SCORERS = ("toxicity", "evasiveness")  # the two terms of the safety objective


def _eval_node(path: tuple[str, ...], node: DictConfig) -> RangeError | None:
    if path != ("eval",):
        return None
    keys = [str(k) for k in node.keys()]
    missing = [k for k in EVAL_KEYS if k not in keys and k not in EVAL_OPTIONAL]
    if missing:
        return _error((*path, missing[0]), "<missing>", "a required key (conf/eval/base.yaml)")
    unknown = [k for k in keys if k not in EVAL_KEYS]
    if unknown:
        return _error((*path, unknown[0]), _read(node, unknown[0]), f"one of {EVAL_KEYS}")
    scorers = _read(node, "scorers")
    for key in EVAL_SCORERS:
        if not isinstance(scorers, DictConfig) or not isinstance(_read(scorers, key), DictConfig):
            return _error((*path, "scorers", key), None, "a scorer node (conf/scorer/*)")
    eval_set = _read(node, "eval_set")  # `???` is check_required's to report
    if eval_set is not _SKIP and not isinstance(eval_set, DictConfig):
        return _error((*path, "eval_set"), eval_set, "an eval set node (conf/eval_set/*)")
    return None


NODE_RULES = (_trainer_stops, _prompt_fits, _eval_node)


def _error(path: tuple[str, ...], value: Any, allowed: str) -> RangeError:
    return RangeError(".".join(path), value, allowed)


def _read(node: DictConfig | ListConfig, key: Any) -> Any:
    try:
        if OmegaConf.is_missing(node, key):
            return _SKIP
        return node[key]
    except Exception:  # an interpolation that only resolves elsewhere (${hydra:...})
        return _SKIP


def _walk(node: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, value) for every node and leaf below `node`, depth first; `hydra` is skipped."""
    keys = range(len(node)) if isinstance(node, ListConfig) else list(node.keys())
    for k in keys:
        if not path and k == "hydra":
            continue
        value = _read(node, k)
        if value is _SKIP:
            continue
        sub = (*path, str(k))
        yield sub, value
        if isinstance(value, DictConfig | ListConfig):
            yield from _walk(value, sub)


def config_errors(cfg: DictConfig) -> list[RangeError]:
    """Every rule violation in `cfg`, in config order."""
    errors: list[RangeError] = []
    for path, value in _walk(cfg, ()):
        if isinstance(value, DictConfig):
            errors += [e for rule in NODE_RULES if (e := rule(path, value))]
            continue
        if isinstance(value, ListConfig):
            continue
        broken = (r for r in RULES if r.matches(path) and not r.check(value))
        rule = next(broken, None)
        err = _error(path, value, rule.allowed) if rule else _finite_everywhere(path, value)
        errors += [err] if err else []
    return errors


def validate_config(cfg: DictConfig) -> None:
    """Raise a ConfigError for the first invalid hyper-parameter (naming the others, if any)
    before any data or model is built."""
    errors = config_errors(cfg)
    if not errors:
        return
    first, others = errors[0], ", ".join(e.key for e in errors[1:])
    if others:
        raise ConfigError(first.key, f"{first.detail} (also invalid: {others})")
    raise first
