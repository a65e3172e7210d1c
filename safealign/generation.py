"""Batched, seeded, resumable sampling from any HF causal LM (ADPO data generation, METHODS.md A.2).

Determinism: every output row (prompt_id, temperature, sample) owns a CPU ``torch.Generator``
seeded from ``stable_hash(seed, prompt_id, temperature, sample, toxic)``. Sampling is done by
:func:`sample_tokens` inside a logits processor that draws one uniform per row and step from that
row's generator (inverse-CDF), and hands HF ``generate`` (run greedy) a one-hot score, so HF's
KV-cached loop never touches the global RNG. Hence a row's text does not depend on the batch
size, on which rows share its batch, on chunking or on resumption. The one caveat is float
numerics: a different amount of left padding changes matmul shapes, which may perturb a logit in
the last bit; a token can then flip only if its uniform lies within that rounding of a CDF
boundary (never observed in the tests; see ``tests/test_generation.py``).

Resumption: prompts are processed in chunks of ``chunk_size`` prompt ids; each finished chunk is
appended to ``<out>.partial`` (one write, flush, fsync). A header line fingerprints the settings
(seed, sampling config without ``batch_size``, prompts); a restart with the same settings keeps
the prompts whose rows are all present (a torn last line is ignored) and generates only the rest.
The model is not fingerprinted: resume a partial file only with the model that started it. The
final file is written atomically and the partial file removed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from safealign.data.chat import has_template, render_prompt
from safealign.data.control import PLACEMENTS
from safealign.errors import ConfigError, DataError
from safealign.io import atomic_open, stable_hash, write_jsonl
from safealign.types import as_response

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings (Hydra-friendly). Paper: T=1.0 and T=1.5 (METHODS.md A.2)."""

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


def sample_tokens(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    u: torch.Tensor,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Pick one token per row: argmax where T=0, else inverse-CDF sampling with uniforms ``u``.

    Warpers in HF's order: temperature, then top-k, then top-p (nucleus: the smallest set of
    most likely tokens whose mass reaches ``top_p``; the most likely token is always kept).

    Args:
        logits: Shape: (B, V).
        temperatures: Shape: (B,), >= 0.
        u: uniforms in [0, 1), Shape: (B,).

    Returns:
        Token ids, Shape: (B,).
    """
    logits = logits.float()
    greedy = temperatures <= 0
    scaled = logits / temperatures.clamp(min=1e-6).unsqueeze(-1).to(logits)  # (B, V)
    if top_k > 0:
        kth = scaled.topk(min(top_k, scaled.size(-1)), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # mass before this token already enough
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1)  # (B, V)
    target = (u.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    sampled = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=cdf.size(-1) - 1)
    return torch.where(greedy.to(sampled.device), logits.argmax(-1), sampled)


class _RowSampler(LogitsProcessor):
    """Samples each row from its own generator; returns one-hot scores for HF's greedy step."""

    def __init__(self, temperatures: list[float], seeds: list[int], top_k: int, top_p: float):
        self.temperatures = torch.tensor(temperatures)
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.top_k, self.top_p = top_k, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        temps = self.temperatures.to(scores.device)
        choice = sample_tokens(scores, temps, u.to(scores.device), self.top_k, self.top_p)
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(-1, choice.unsqueeze(-1), 0.0)


def row_seed(seed: int, prompt_id: int, temperature: float, sample: int, toxic: bool) -> int:
    return int(stable_hash(seed, prompt_id, float(temperature), sample, toxic, length=15), 16)


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    # Tokenised exactly as the collator encodes prompts (data/collate.py, data/chat.py).
    return [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding (decoder-only generation continues from the last column). Shape: (B, T)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _context_limit(model, max_new_tokens: int) -> int:
    n_ctx = getattr(model.config, "max_position_embeddings", None) or 10**9
    if n_ctx - max_new_tokens < 1:
        raise ConfigError(
            "generation.max_new_tokens",
            f"{max_new_tokens} leaves no room for the prompt in {n_ctx} positions",
        )
    return n_ctx - max_new_tokens


def _generate_batch(
    model, tokenizer, items: list[dict], s: SamplingConfig, limit: int, add_special_tokens: bool
) -> list[dict]:
    """Generate the rows described by ``items`` (each has model_prompt, temperature, seed)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    full = _encode(tokenizer, [it["model_prompt"] for it in items], add_special_tokens)
    # Too long: keep the END, as TRL's keep_end (the last turns matter most; [TOXIC] must survive).
    ids, mask = _left_pad([e[-limit:] for e in full], pad)
    device = next(model.parameters()).device
    sampler = _RowSampler(
        [it["temperature"] for it in items], [it["seed"] for it in items], s.top_k, s.top_p
    )
    # Greedy over one-hot scores == our per-row sample. Neutral values are set explicitly so a
    # checkpoint's generation_config (e.g. repetition_penalty) cannot leak in.
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        logits_processor=LogitsProcessorList([sampler]),
        do_sample=False,
        num_beams=1,
        max_new_tokens=s.max_new_tokens,
        min_new_tokens=0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    rows = []
    for i, it in enumerate(items):
        new = out[i, ids.size(1) :].tolist()
        n = new.index(eos) if eos in new else len(new)
        text = tokenizer.decode(new[:n], skip_special_tokens=True).strip()
        rows.append(
            {
                k: it[k]
                for k in ("prompt_id", "prompt", "model_prompt", "temperature", "sample", "toxic")
            }
            | {
                "response": as_response(text) if text else "",
                "n_tokens": n,
                "empty": not text,
                "prompt_truncated": len(full[i]) > limit,
            }
        )
    return rows


def _fingerprint(seed: int, s: SamplingConfig, prompts: list[str]) -> str:
    settings = asdict(s) | {"temperatures": [float(t) for t in s.temperatures]}
    settings.pop("batch_size")  # outputs do not depend on it: resuming with another size is fine
    return stable_hash(seed, settings, prompts, "generation-v1")


def _load_partial(path: Path, fingerprint: str, per_prompt: int) -> dict[int, list[dict]]:
    """Rows of fully finished prompts in a partial file; {} if absent or from other settings."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    try:
        header = json.loads(lines[0])["__header__"]
    except (json.JSONDecodeError, KeyError, TypeError):
        header = None
    if header is None or header.get("fingerprint") != fingerprint:
        log.warning("%s was written with other settings; starting over", path)
        return {}
    done: dict[int, list[dict]] = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) or (n == len(lines) - 1 and not lines[-1]):
                break  # torn last line from a crash mid-write: that chunk is redone
            raise DataError(
                path, f"corrupt JSON in the middle of a partial file: {e}", line=n
            ) from e
        if not isinstance(row, dict) or not isinstance(row.get("prompt_id"), int):
            raise DataError(path, "expected a generation row with an integer prompt_id", line=n)
        done.setdefault(row["prompt_id"], []).append(row)
    return {pid: rows for pid, rows in done.items() if len(rows) == per_prompt}


def _write_header_and(path: Path, fingerprint: str, rows: list[dict]) -> None:
    with atomic_open(path) as f:
        f.write(json.dumps({"__header__": {"fingerprint": fingerprint}}) + "\n")
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def summarize(rows: list[dict]) -> dict:
    """Counts for the logs: rows, empty generations, truncated prompts, mean tokens."""
    n = len(rows)
    return {
        "rows": n,
        "empty": sum(r["empty"] for r in rows),
        "prompt_truncated": sum(r.get("prompt_truncated", False) for r in rows),
        "mean_tokens": sum(r["n_tokens"] for r in rows) / n if n else math.nan,
    }


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
    """Sample ``n_samples`` responses per prompt and temperature (METHODS.md A.2 steps 2-3).

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
    if not prompts:
        raise ValueError("generate: empty prompt list")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("generate: every prompt must be a string")
    if chunk_size < 1:
        raise ConfigError("generation.chunk_size", f"need >= 1, got {chunk_size}")
    if sampling.toxic and not render:
        raise ValueError("generate: toxic=True needs render=True (the token is placed there)")
    # a rendered chat template owns BOS: tokenised without specials, as the collator does
    add_special_tokens = add_special_tokens and not (render and has_template(tokenizer))
    temps = check_sampling(sampling)
    if tokenizer.eos_token_id is None:
        raise ConfigError("model.tokenizer", "the tokenizer has no eos token")
    per_prompt = len(temps) * sampling.n_samples
    fp = _fingerprint(seed, sampling, prompts)
    partial = Path(f"{out_path}.partial") if out_path is not None else None
    done = _load_partial(partial, fp, per_prompt) if partial is not None else {}
    if partial is not None:  # rewrite without any torn tail before appending to it
        _write_header_and(partial, fp, [r for pid in sorted(done) for r in done[pid]])
    todo = [pid for pid in range(len(prompts)) if pid not in done]
    if done:
        log.info("resuming: %d of %d prompts already generated", len(done), len(prompts))
    rows = _run(
        model,
        tokenizer,
        prompts,
        todo,
        sampling,
        temps,
        seed,
        partial,
        progress,
        chunk_size,
        add_special_tokens,
        on_chunk,
        render,
    )
    rows += [r for pid in done for r in done[pid]]
    order = {t: i for i, t in enumerate(temps)}
    rows.sort(key=lambda r: (r["prompt_id"], order[r["temperature"]], r["sample"]))
    stats = summarize(rows)
    if stats["empty"]:
        log.warning(
            "%d of %d generations are empty (kept, flagged empty=true)", stats["empty"], len(rows)
        )
    log.info("generation: %s", stats)
    if out_path is not None:
        write_jsonl(out_path, rows)
        partial.unlink(missing_ok=True)
    return rows


def _run(
    model,
    tokenizer,
    prompts,
    todo,
    s,
    temps,
    seed,
    partial,
    progress,
    chunk_size,
    add_special_tokens,
    on_chunk,
    render,
) -> list[dict]:
    from tqdm.auto import tqdm

    limit = _context_limit(model, s.max_new_tokens)
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    bar = tqdm(total=len(todo) * len(temps) * s.n_samples, disable=not progress, desc="generate")
    try:
        for c, start in enumerate(range(0, len(todo), chunk_size)):
            items = []
            for pid in todo[start : start + chunk_size]:
                placement = s.placement if s.toxic else None
                fed = render_prompt(tokenizer, prompts[pid], placement) if render else prompts[pid]
                items += [
                    {
                        "prompt_id": pid,
                        "prompt": prompts[pid],
                        "model_prompt": fed,
                        "temperature": t,
                        "sample": j,
                        "toxic": s.toxic,
                        "seed": row_seed(seed, pid, t, j, s.toxic),
                    }
                    for t in temps
                    for j in range(s.n_samples)
                ]
            items.sort(key=lambda it: len(it["model_prompt"]))  # less padding; text unaffected
            chunk_rows = []
            # fork_rng: sampling uses per-row generators only; this guards the caller's global
            # CPU stream against any model code that might still draw from it.
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                for b in range(0, len(items), s.batch_size):
                    batch = items[b : b + s.batch_size]
                    chunk_rows += _generate_batch(
                        model, tokenizer, batch, s, limit, add_special_tokens
                    )
                    bar.update(len(batch))
            if partial is not None:
                with open(partial, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chunk_rows))
                    f.flush()
                    os.fsync(f.fileno())
            rows += chunk_rows
            if on_chunk is not None:
                on_chunk(c, start + len(todo[start : start + chunk_size]))
    finally:
        bar.close()
        model.train(was_training)
    return rows
