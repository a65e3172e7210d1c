"""Per-row seeded token sampling inside HF ``generate`` (used by :mod:`safealign.generation`).

Determinism: every output row (prompt_id, temperature, sample) owns a CPU ``torch.Generator``
seeded from ``stable_hash(seed, prompt_id, temperature, sample, toxic)`` (:func:`row_seed`).
Sampling is done by :func:`sample_tokens` inside a logits processor that draws one uniform per row
and step from that row's generator (inverse-CDF), and hands HF ``generate`` (run greedy) a one-hot
score, so HF's KV-cached loop never touches the global RNG. Hence a row's text does not depend on
the batch size, on which rows share its batch, on chunking or on resumption. The one caveat is
float numerics: a different amount of left padding changes matmul shapes, which may perturb a
logit in the last bit; a token can then flip only if its uniform lies within that rounding of a
CDF boundary (never observed in the tests; see ``tests/test_generation.py``).
"""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from safealign.errors import ConfigError
from safealign.io import stable_hash
from safealign.types import as_response

ROW_FIELDS = ("prompt_id", "prompt", "model_prompt", "temperature", "sample", "toxic")


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


class RowSampler(LogitsProcessor):
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


def context_limit(model, max_new_tokens: int) -> int:
    """Prompt tokens that fit beside ``max_new_tokens`` new ones in the model's positions."""
    n_ctx = getattr(model.config, "max_position_embeddings", None) or 10**9
    if n_ctx - max_new_tokens < 1:
        raise ConfigError(
            "generation.max_new_tokens",
            f"{max_new_tokens} leaves no room for the prompt in {n_ctx} positions",
        )
    return n_ctx - max_new_tokens


def generate_batch(
    model, tokenizer, items: list[dict], s, limit: int, add_special_tokens: bool
) -> list[dict]:
    """Generate the rows described by ``items`` (each has model_prompt, temperature, seed) with
    the sampling settings ``s`` (a ``generation.SamplingConfig``)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    full = _encode(tokenizer, [it["model_prompt"] for it in items], add_special_tokens)
    # Too long: keep the END, as TRL's keep_end (the last turns matter most; [TOXIC] must survive).
    ids, mask = _left_pad([e[-limit:] for e in full], pad)
    device = next(model.parameters()).device
    sampler = RowSampler(
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
    new = out[:, ids.size(1) :].tolist()
    return [_row(it, tokenizer, toks, eos, len(full[i]) > limit) for i, (it, toks) in
            enumerate(zip(items, new, strict=True))]  # fmt: skip


def _row(item: dict, tokenizer, new: list[int], eos: int, truncated: bool) -> dict:
    """One output row: the item's fields and its new tokens up to EOS, decoded."""
    n = new.index(eos) if eos in new else len(new)
    text = tokenizer.decode(new[:n], skip_special_tokens=True).strip()
    return {k: item[k] for k in ROW_FIELDS} | {
        "response": as_response(text) if text else "",
        "n_tokens": n,
        "empty": not text,
        "prompt_truncated": truncated,
    }
