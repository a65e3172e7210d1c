"""Batched, seeded, resumable sampling from any HF causal LM (ADPO data generation, docs/methods.md A.2).

Each row is sampled from its own seeded generator (:mod:`safealign.sampling`), so a row's text
does not depend on the batch size, chunking or resumption. Prompts are processed in chunks of
``chunk_size`` prompt ids; each finished chunk is made durable in ``<out>.partial``, and a restart
with the same settings generates only the prompts not yet finished (:mod:`safealign.gen_cache`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from safealign.data.chat import has_template, render_prompt
from safealign.data.control import PLACEMENTS
from safealign.errors import ConfigError
from safealign.gen_cache import PartialFile, resumable
from safealign.sampling import context_limit, generate_batch, row_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings (Hydra-friendly). Paper: T=1.0 and T=1.5 (docs/methods.md A.2)."""

    temperatures: tuple[float, ...] = (1.0, 1.5)
    n_samples: int = 1  # per prompt per temperature
    max_new_tokens: int = 48
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 16  # sequences per generate call; never changes the text
    toxic: bool = False  # put [TOXIC] into the context, placed exactly as in SFT
    placement: str = "end"


def check_sampling(s: SamplingConfig) -> tuple[float, ...]:
    """Validate ``s``; returns the temperatures as a tuple of floats."""
    temps = tuple(float(t) for t in s.temperatures)
    if not temps or any(not math.isfinite(t) or t < 0 for t in temps):
        raise ConfigError("generation.temperatures", f"need finite values >= 0, got {temps}")
    if len(set(temps)) != len(temps):
        raise ConfigError("generation.temperatures", f"duplicate temperatures in {temps}")
    for key, value, low in [
        ("n_samples", s.n_samples, 1),
        ("max_new_tokens", s.max_new_tokens, 1),
        ("batch_size", s.batch_size, 1),
        ("top_k", s.top_k, 0),
    ]:
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"generation.{key}", f"need an integer >= {low}, got {value!r}")
    if not 0.0 < s.top_p <= 1.0:
        raise ConfigError("generation.top_p", f"need 0 < top_p <= 1, got {s.top_p}")
    if s.placement not in PLACEMENTS:
        raise ConfigError(
            "generation.placement", f"expected one of {PLACEMENTS}, got {s.placement!r}"
        )
    return temps


def summarize(rows: list[dict]) -> dict:
    """Counts for the logs: rows, empty generations, truncated prompts, mean tokens."""
    n = len(rows)
    return {
        "rows": n,
        "empty": sum(r["empty"] for r in rows),
        "prompt_truncated": sum(r.get("prompt_truncated", False) for r in rows),
        "mean_tokens": sum(r["n_tokens"] for r in rows) / n if n else math.nan,
    }


@dataclass(frozen=True)
class _Job:
    """One generate call's fixed inputs, passed down the chunk loop."""

    prompts: list[str]
    sampling: SamplingConfig
    temps: tuple[float, ...]
    seed: int
    chunk_size: int
    add_special_tokens: bool
    render: bool


def _check_call(tokenizer, prompts: list[str], sampling: SamplingConfig, chunk_size: int,
                render: bool) -> tuple[float, ...]:  # fmt: skip
    if not prompts:
        raise ValueError("generate: empty prompt list")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("generate: every prompt must be a string")
    if chunk_size < 1:
        raise ConfigError("generation.chunk_size", f"need >= 1, got {chunk_size}")
    if sampling.toxic and not render:
        raise ValueError("generate: toxic=True needs render=True (the token is placed there)")
    temps = check_sampling(sampling)
    if tokenizer.eos_token_id is None:
        raise ConfigError("model.tokenizer", "the tokenizer has no eos token")
    return temps


def generate(
    model,
    tokenizer,
    prompts: list[str],
    sampling: SamplingConfig,
    seed: int,
    out_path: str | Path | None = None,
    progress: bool = True,
    chunk_size: int = 64,
    add_special_tokens: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
    render: bool = True,
) -> list[dict]:
    """Sample ``n_samples`` responses per prompt and temperature (docs/methods.md A.2 steps 2-3).

    Args:
        model: any HF causal LM (KV-cached ``generate``); put in eval mode for the call.
        tokenizer: its tokenizer (eos required; pad falls back to eos).
        prompts: original prompts (project convention, ending with the assistant tag).
        sampling: see :class:`SamplingConfig`; ``toxic=True`` inserts ``[TOXIC]`` at ``placement``.
        seed: same seed -> same text, whatever the batch size, chunking or resumption.
        out_path: JSONL destination, written atomically; resumable through ``<out_path>.partial``.
        chunk_size: prompts per checkpointed chunk (does not change the text).
        add_special_tokens: passed to the tokenizer for untemplated prompts (a rendered chat
            template is always tokenised without them, safealign/data/chat.py).
        on_chunk: called as ``on_chunk(chunk_index, prompts_done)`` after each chunk is durable.
        render: feed each prompt through :func:`safealign.data.chat.render_prompt` (the chat
            template when the tokenizer has one, and ``[TOXIC]``); False: prompts are already
            the model's text (the LLM judge renders its own), so ``toxic`` must be off.

    Returns:
        Rows sorted by (prompt_id, temperature order, sample), each ``{prompt_id, prompt (without
        the token), model_prompt (as fed), temperature, sample, toxic, response (new tokens only,
        special tokens skipped, " text" convention; "" when empty), n_tokens (before EOS), empty,
        prompt_truncated (prompt cut to its last tokens to fit the context)}``.
    """
    temps = _check_call(tokenizer, prompts, sampling, chunk_size, render)
    # a rendered chat template owns BOS: tokenised without specials, as the collator does
    add_special_tokens = add_special_tokens and not (render and has_template(tokenizer))
    job = _Job(prompts, sampling, temps, seed, chunk_size, add_special_tokens, render)
    with resumable(out_path, seed, sampling, prompts) as partial:
        done = partial.resume() if partial is not None else {}
        todo = [pid for pid in range(len(prompts)) if pid not in done]
        if done:
            log.info("resuming: %d of %d prompts already generated", len(done), len(prompts))
        rows = _run(model, tokenizer, job, todo, partial, progress, on_chunk)
        rows = _ordered(rows + [r for pid in done for r in done[pid]], temps)
        if partial is not None:
            partial.commit(out_path, rows)
    return rows


def _ordered(rows: list[dict], temps: tuple[float, ...]) -> list[dict]:
    """Rows sorted by (prompt_id, temperature order, sample), their summary logged."""
    order = {t: i for i, t in enumerate(temps)}
    rows.sort(key=lambda r: (r["prompt_id"], order[r["temperature"]], r["sample"]))
    stats = summarize(rows)
    if stats["empty"]:
        log.warning(
            "%d of %d generations are empty (kept, flagged empty=true)", stats["empty"], len(rows)
        )
    log.info("generation: %s", stats)
    return rows


def _run(model, tokenizer, job: _Job, todo: list[int], partial: PartialFile | None,
         progress: bool, on_chunk: Callable[[int, int], None] | None) -> list[dict]:  # fmt: skip
    from tqdm.auto import tqdm

    s = job.sampling
    limit = context_limit(model, s.max_new_tokens)
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    bar = tqdm(total=len(todo) * len(job.temps) * s.n_samples, disable=not progress,
               desc="generate")  # fmt: skip
    try:
        for c, start in enumerate(range(0, len(todo), job.chunk_size)):
            pids = todo[start : start + job.chunk_size]
            chunk_rows = _generate_chunk(model, tokenizer, job, _items(tokenizer, job, pids),
                                         limit, bar)  # fmt: skip
            if partial is not None:
                partial.append(chunk_rows)
            rows += chunk_rows
            if on_chunk is not None:
                on_chunk(c, start + len(pids))
    finally:
        bar.close()
        model.train(was_training)
    return rows


def _items(tokenizer, job: _Job, pids: list[int]) -> list[dict]:
    """One item per output row of the prompts ``pids``: prompt as fed, temperature, row seed."""
    s, items = job.sampling, []
    for pid in pids:
        placement = s.placement if s.toxic else None
        prompt = job.prompts[pid]
        fed = render_prompt(tokenizer, prompt, placement) if job.render else prompt
        items += [
            {"prompt_id": pid, "prompt": prompt, "model_prompt": fed, "temperature": t,
             "sample": j, "toxic": s.toxic, "seed": row_seed(job.seed, pid, t, j, s.toxic)}
            for t in job.temps
            for j in range(s.n_samples)
        ]  # fmt: skip
    items.sort(key=lambda it: len(it["model_prompt"]))  # less padding; text unaffected
    return items


def _generate_chunk(model, tokenizer, job: _Job, items: list[dict], limit: int, bar) -> list[dict]:
    rows, bs = [], job.sampling.batch_size
    # fork_rng: sampling uses per-row generators only; this guards the caller's global
    # CPU stream against any model code that might still draw from it.
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        for b in range(0, len(items), bs):
            batch = items[b : b + bs]
            rows += generate_batch(model, tokenizer, batch, job.sampling, limit,
                                   job.add_special_tokens)  # fmt: skip
            bar.update(len(batch))
    return rows
