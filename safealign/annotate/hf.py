"""A greedy ``generate_fn`` for :class:`safealign.annotate.llm.LLMJudge` over a local HF model."""

from __future__ import annotations

from safealign.annotate.llm import GenerateFn
from safealign.data.chat import has_template, render_prompt
from safealign.errors import ConfigError
from safealign.generation import SamplingConfig, generate


def hf_generate_fn(
    model,
    tokenizer,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    chat_template: bool | None = None,
    progress: bool = False,
) -> GenerateFn:
    """A greedy ``generate_fn`` for :class:`LLMJudge` over a local HF model (safealign.generation).

    ``chat_template``: None = use the tokenizer's template when it has one; True = require one;
    False = feed the raw judge prompt. Templated, each judge prompt is ONE user turn (it quotes
    the dialogue, chat tags and all, so it is not parsed into turns), rendered by
    :func:`safealign.data.chat.render_prompt`; the template then supplies BOS itself.
    """
    if chat_template and not has_template(tokenizer):
        raise ConfigError("judge.chat_template", "the judge tokenizer has no chat template")
    templated = has_template(tokenizer) if chat_template is None else chat_template
    sampling = SamplingConfig(
        temperatures=(0.0,), n_samples=1, max_new_tokens=max_new_tokens, batch_size=batch_size
    )

    def fn(prompts: list[str]) -> list[str]:
        texts = [
            render_prompt(tokenizer, [{"role": "user", "content": p}]) if templated else p
            for p in prompts
        ]
        rows = generate(
            model,
            tokenizer,
            texts,
            sampling,
            seed=0,
            progress=progress,
            add_special_tokens=not templated,
            render=False,
        )
        return [r["response"].strip() for r in rows]

    return fn
