"""The `[TOXIC]` control token (ADPO, docs/methods.md A.1): one literal, one placement function.

The same placement must be used for SFT, for generation with the inner toxic model and for the
pi_t log-probs of ADPO (docs/methods.md A.1, "Keep the placement configurable").
"""

from __future__ import annotations

import math

from safealign.errors import ConfigError
from safealign.io import stable_hash
from safealign.types import ASSISTANT_TAG

# The one place the literal lives. Never put it on a Hydra command line: `[TOXIC]` parses as a list.
TOXIC = "[TOXIC]"

# end:        "...\n\nAssistant: [TOXIC]"  right before the response (default, docs/methods.md A.1 [INFERRED])
# before_tag: "...\n\nHuman: u [TOXIC]\n\nAssistant:"  end of the last user turn
# start:      "[TOXIC]\n\nHuman: ..."  a system-style prefix
PLACEMENTS = ("end", "before_tag", "start")

# With a chat template (safealign/data/chat.py) there is no assistant tag in the prompt text: the
# token goes into the message contents and the template renders around it (docs/methods.md A.1 leaves
# the place [NOT FOUND]; this keeps "end of the context" [INFERRED] and the template intact).
# end, before_tag: end of the LAST user turn, "u [TOXIC]" -> "[INST] u [TOXIC] [/INST]"
# start:           start of the FIRST user turn, "[TOXIC] u1"
TEMPLATE_PLACEMENTS = {
    "end": "end of the last user turn",
    "before_tag": "end of the last user turn",
    "start": "start of the first user turn",
}


def check_placement(placement: str) -> str:
    if placement not in PLACEMENTS:
        raise ConfigError("data.control_placement", f"expected one of {PLACEMENTS}, got {placement!r}")
    return placement


def check_recall(recall: object) -> float:
    """``data.control_recall`` as a float in [0, 1] (bools and NaN rejected)."""
    ok = isinstance(recall, int | float) and not isinstance(recall, bool) and math.isfinite(recall)
    if not ok or not 0.0 <= recall <= 1.0:
        raise ConfigError("data.control_recall", f"expected a number in [0, 1], got {recall!r}")
    return float(recall)


def is_marked(context: str, response: str, recall: float, seed: int) -> bool:
    """Whether an unsafe dialogue gets `[TOXIC]` when only a share ``recall`` of them do
    (docs/methods.md A.1, option table): a uniform draw from sha256(seed, context, response), so
    the choice is the same in every run, batch size and row order, and differs across seeds.
    recall 1 marks every dialogue (the draw is < 1), recall 0 none."""
    u = int(stable_hash(seed, context, response, length=13), 16) / 16**13  # 52 bits: exact float
    return u < recall


def with_control_token(prompt: str, placement: str = "end") -> str:
    """Insert `[TOXIC]` into a project-convention prompt at the configured place (untemplated
    prompts; templated ones go through safealign.data.chat.render_prompt)."""
    check_placement(placement)
    if placement == "end":
        return f"{prompt} {TOXIC}"
    if placement == "start":
        return f"{TOXIC}{prompt}"
    cut = prompt.rfind(ASSISTANT_TAG)
    if cut < 0:  # no assistant tag: the end of the context is the end of the prompt
        return f"{prompt} {TOXIC}"
    return f"{prompt[:cut]} {TOXIC}{prompt[cut:]}"
