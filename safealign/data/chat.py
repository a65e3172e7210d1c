"""Chat templates: one place where a project prompt becomes the text a model is fed (issue 10.3).

Prompts are project-format transcripts (``"\\n\\nHuman: u\\n\\nAssistant:"``, safealign.types).
Without a chat template on the tokenizer they are fed as they are (``[TOXIC]`` inserted by
:func:`safealign.data.control.with_control_token`): ids are unchanged from before this module.
With one (the tokenizer's own, or ``model.tokenizer.chat_template``) the transcript is parsed into
user/assistant turns (:func:`dialogue_turns`) and rendered with
``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``, for SFT,
preference training, generation, the LLM judge and evaluation alike (:func:`render_prompt`).

Decisions (each checked in tests/test_chat_template.py):

* BOS: the template owns the whole prompt format, so a rendered prompt is tokenised with
  ``add_special_tokens=False`` (what ``apply_chat_template(tokenize=True)`` does): a template that
  emits ``<s>`` gets exactly one BOS, one that emits none (ChatML) gets none.
* Response: the assistant turn as the template renders it (``" text </s>"`` for Llama-2-chat,
  ``"text<|im_end|>\\n"`` for ChatML), cut just after its first EOS, so the labelled response ends
  with the token generation stops on (``tokenizer.eos_token_id``; Qwen2-Instruct's is
  ``<|im_end|>``, Llama-2-chat's ``</s>``). A template whose assistant turn has no EOS gets one
  appended, as untemplated rows do. Prompt + response ids then equal the ids of the whole
  templated conversation up to that EOS, and the prompt positions are exactly the ones masked.
* ``[TOXIC]``: see :data:`safealign.data.control.TEMPLATE_PLACEMENTS`; it is put into the
  message contents and the template renders around it.
"""

from __future__ import annotations

import re

from safealign.data.control import TOXIC, check_placement, with_control_token
from safealign.errors import ConfigError
from safealign.types import ASSISTANT_TAG, HUMAN_TAG

Messages = list[dict[str, str]]
_TAGS = re.compile(f"({re.escape(HUMAN_TAG)}|{re.escape(ASSISTANT_TAG)})")
ROLES = {"user": "user", "system": "assistant"}  # dialogue_turns speaker -> chat role


def dialogue_turns(context: str) -> list[tuple[str, str]]:
    """(speaker, text) turns of a project-format context, speaker "user" or "system". The
    prompt's final empty ``"\\n\\nAssistant:"`` (it opens the reply) is dropped; text outside
    the chat tags is a user turn."""
    parts = _TAGS.split(context)
    turns = [("user", parts[0].strip())] if parts[0].strip() else []
    for tag, text in zip(parts[1::2], parts[2::2], strict=True):
        turns.append(("user" if tag == HUMAN_TAG else "system", text.strip()))
    if turns and turns[-1] == ("system", ""):
        turns.pop()
    return turns


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def to_messages(prompt: str, placement: str | None = None) -> Messages:
    """User/assistant messages of a project-format prompt, ``[TOXIC]`` placed when asked
    (``end``/``before_tag``: end of the last user turn; ``start``: start of the first)."""
    msgs = [{"role": ROLES[who], "content": text} for who, text in dialogue_turns(prompt)]
    if placement is None:
        return msgs
    check_placement(placement)
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    if not users:  # no user turn to carry the token: it becomes the user turn
        return [*msgs, {"role": "user", "content": TOXIC}]
    i = users[0] if placement == "start" else users[-1]
    text = msgs[i]["content"]
    joined = f"{TOXIC} {text}" if placement == "start" else f"{text} {TOXIC}"
    msgs[i] = {"role": "user", "content": joined.strip()}
    return msgs


def render_prompt(tokenizer, prompt: str | Messages, placement: str | None = None) -> str:
    """The text fed to the model for ``prompt`` (a project transcript, or messages as-is),
    ``[TOXIC]`` at ``placement`` (None: no token). Untemplated: the transcript unchanged."""
    if not has_template(tokenizer):
        if not isinstance(prompt, str):
            raise ConfigError("model.tokenizer.chat_template", "messages need a chat template")
        return prompt if placement is None else with_control_token(prompt, placement)
    msgs = to_messages(prompt, placement) if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a rendered prompt: no tokenizer specials when a template rendered it."""
    special = add_special_tokens and not has_template(tokenizer)
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def response_ids(tokenizer, prompt: str, response: str, placement: str | None = None) -> list[int]:
    """Response ids ending with EOS (see the module docstring for the templated form)."""
    eos = tokenizer.eos_token_id
    if not has_template(tokenizer):
        return tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
    msgs = to_messages(prompt, placement)
    head = render_prompt(tokenizer, msgs)
    turn = {"role": "assistant", "content": response.strip()}
    full = tokenizer.apply_chat_template([*msgs, turn], tokenize=False)
    if not full.startswith(head):
        raise ConfigError(
            "model.tokenizer.chat_template",
            "the template's generation prompt is not a prefix of the rendered conversation, "
            "so prompt and response cannot be split for masking",
        )
    ids = tokenizer(full[len(head) :], add_special_tokens=False)["input_ids"]
    return ids[: ids.index(eos) + 1] if eos in ids else [*ids, eos]
