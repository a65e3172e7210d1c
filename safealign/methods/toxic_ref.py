"""Where ADPO's inner toxic model pi_t(y_t | x) comes from (docs/methods.md A.3), chosen by `_target_`.

    method.toxic_ref: {_target_: safealign.methods.toxic_ref.FrozenSFT}       # default
    python train.py experiment=adpo_builtin \
        method.toxic_ref._target_=safealign.methods.toxic_ref.PolicyDetached

The paper leaves open whether pi_t stays the frozen SFT weights or follows the policy; both are
offered (A.3). Each option gets two zero-argument scorers and calls the one it needs, so the
other forward never runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from torch import Tensor

from safealign.errors import ConfigError

Scorer = Callable[[], Tensor | None]


class ToxicRef(ABC):
    """Picks pi_t's log-probs of the toxic response after prompt + [TOXIC], Shape: (B,)."""

    @abstractmethod
    def __call__(self, frozen: Scorer, policy: Scorer) -> Tensor | None:
        """``frozen()``: the initial (SFT) weights' score (cached or a frozen copy);
        ``policy()``: the current policy's score, no gradient."""

    def __repr__(self) -> str:
        return f"{type(self).__module__}.{type(self).__qualname__}"


class FrozenSFT(ToxicRef):
    """pi_t = the frozen initial SFT weights conditioned on [TOXIC] (A.3, the default): scored
    once with the reference log-probs (or by the frozen copy), a fixed anchor."""

    def __call__(self, frozen: Scorer, policy: Scorer) -> Tensor | None:
        return frozen()


class PolicyDetached(ToxicRef):
    """pi_t = the CURRENT policy conditioned on [TOXIC], without gradient, every step: the anchor
    moves with training (one extra no-grad forward per step)."""

    def __call__(self, frozen: Scorer, policy: Scorer) -> Tensor | None:
        return policy()


def check_toxic_ref(value: object) -> ToxicRef:
    """``value`` when it is a :class:`ToxicRef`, else a ConfigError naming ``method.toxic_ref``
    (e.g. the string a pre-issue-13 override such as ``method.toxic_ref=policy_detached`` gives)."""
    if isinstance(value, ToxicRef):
        return value
    options = ", ".join(f"{__name__}.{c.__name__}" for c in (FrozenSFT, PolicyDetached))
    raise ConfigError(
        "method.toxic_ref",
        f"expected a {{_target_: ...}} node naming one of {options}; got {value!r} "
        f"(override with method.toxic_ref._target_={__name__}.PolicyDetached)",
    )
