"""ISAAC's rephraser variant: seq2seq data and test-time rewriting (docs/methods.md B.3, B.5).

The rephraser maps "User: " + u + " System: " + r to the ISAAC pseudo responses of (u, r)
(B.3). The same input string is used at training and at test time; the authors fed only the
response at inference (a train/test mismatch; B.5 "Rephraser input", noted deviation).

* :class:`RephraseDataModule` - IsaacDataModule's per-stage sampling (tempering, B.4/B.5),
  encoded for an encoder-decoder: one source row and M target rows per context.
* :func:`rewrite` - apply a trained rephraser to a model's responses: all of them, or only those a
  detector flags (B.3 "Deployment modes"); greedy, repetition_penalty 2.5, no_repeat_ngram 3.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from safealign.data.chat import dialogue_turns
from safealign.data.collate import IGNORE, pad
from safealign.errors import ConfigError
from safealign.isaac.datamodule import IsaacDataModule
from safealign.types import MultiTargetExample, as_response

log = logging.getLogger(__name__)
SPEAKERS = {"user": "User", "system": "System"}


def rephrase_input(context: str, response: str) -> str:
    """B.3's source string "User: u System: r"; earlier turns of a multi-turn context come first
    in the same "User: ... System: ..." form."""
    turns = [f"{SPEAKERS[who]}: {text}" for who, text in dialogue_turns(context)]
    return " ".join([*turns, f"System: {response.strip()}"])


@dataclass(frozen=True)
class Seq2SeqEncoded:
    input_ids: list[int]
    targets: list[list[int]]
    truncated: bool


def encode_text(tokenizer, text: str, max_length: int) -> tuple[list[int], bool]:
    """Tokens + EOS, right-truncated to ``max_length`` (B.3; EOS kept). Returns (ids, truncated)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[: max_length - 1] + [tokenizer.eos_token_id], len(ids) > max_length - 1


@dataclass
class Seq2SeqCollator:
    """Sources (B, S) once, targets (B * M, T) grouped M rows per context, padding -100 (B.5).
    Item: (index, Seq2SeqEncoded)."""

    pad_id: int

    def __call__(self, items: list[tuple[int, Seq2SeqEncoded]]) -> dict[str, torch.Tensor]:
        sources = [e.input_ids for _, e in items]
        targets = [t for _, e in items for t in e.targets]
        return {
            "input_ids": pad(sources, self.pad_id),
            "attention_mask": pad([[1] * len(s) for s in sources], 0),
            "labels": pad(targets, IGNORE),
            "n_targets": torch.tensor(len(items[0][1].targets), dtype=torch.long),
            "index": torch.tensor([i for i, _ in items], dtype=torch.long),
        }


class RephraseDataModule(IsaacDataModule):
    """IsaacDataModule (same sampler, caching and per-stage resampling) encoded for seq2seq.

    Args (beyond IsaacDataModule): max_source_length, max_target_length: token budgets (128 in
    B.3). Validation/test targets are M copies of the original response (IsaacDataModule).
    """

    def __init__(
        self,
        source,
        encoder,
        sampler: dict,
        max_source_length: int = 128,
        max_target_length: int = 128,
        **kwargs,
    ) -> None:
        for key, n in (
            ("max_source_length", max_source_length),
            ("max_target_length", max_target_length),
        ):
            if n < 2:
                raise ConfigError(f"data.{key}", f"must be >= 2 (room for EOS), got {n}")
        corpus = source() if callable(source) else source
        # Labels are lost once records become MultiTargetExample; keep them for summaries only.
        labels = {(d.context, d.response): d.label for d in corpus.train + corpus.val + corpus.test}
        super().__init__(source=corpus, encoder=encoder, sampler=sampler, **kwargs)
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.labels = labels

    def texts(self) -> list[str]:
        out: list[str] = []
        for r in self.corpus.train:
            out += [rephrase_input(r.context, r.original), *r.targets]
        return out

    def _encode(self, r: MultiTargetExample) -> Seq2SeqEncoded:
        src, cut = encode_text(
            self.tokenizer, rephrase_input(r.context, r.original), self.max_source_length
        )
        targets = [
            encode_text(self.tokenizer, t.strip(), self.max_target_length) for t in r.targets
        ]
        truncated = cut or any(c for _, c in targets)
        self.stats["truncated"] += truncated
        return Seq2SeqEncoded(src, [ids for ids, _ in targets], truncated)

    def collator(self) -> Seq2SeqCollator:
        return Seq2SeqCollator(self.tokenizer.pad_token_id)

    def held_out(self, n: int) -> list[tuple[str, str, str]]:
        """Up to n (context, response, label) rows of the test split (else val)."""
        rows = self.corpus.test or self.corpus.val
        return [
            (r.context, r.original, self.labels.get((r.context, r.original), "unknown"))
            for r in rows[:n]
        ]


@torch.inference_mode()
def generate_rewrites(
    model,
    tokenizer,
    sources: Sequence[str],
    *,
    batch_size: int = 16,
    max_source_length: int = 128,
    max_length: int = 256,
    repetition_penalty: float = 2.5,
    no_repeat_ngram_size: int = 3,
) -> list[str]:
    """Greedy decoding of each source string (B.3 inference settings). Deterministic."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    for i in range(0, len(sources), batch_size):
        rows = [
            encode_text(tokenizer, s, max_source_length)[0] for s in sources[i : i + batch_size]
        ]
        ids = pad(rows, tokenizer.pad_token_id).to(device)
        mask = pad([[1] * len(r) for r in rows], 0).to(device)
        gen = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1, max_length=max_length,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        out += tokenizer.batch_decode(gen, skip_special_tokens=True)
    model.train(was_training)
    return out


@dataclass
class RewriteResult:
    """New responses (unchanged where not rewritten) and, per row, whether it was rewritten."""

    responses: list[str]
    rewritten: np.ndarray  # (N,) bool
    scores: np.ndarray | None  # (N,) detector scores; None without a detector
    n_unscored: int = 0  # detector returned nan: left unchanged
    n_empty: int = 0  # rephraser produced nothing: original kept


def rewrite(
    model,
    tokenizer,
    contexts: Sequence[str],
    responses: Sequence[str],
    detector=None,
    threshold: float = 0.5,
    **generation,
) -> RewriteResult:
    """Rewrite every response (no detector), or only those with ``detector`` score >= threshold.

    Args:
        model, tokenizer: A trained rephraser (``method=rephraser`` export).
        contexts, responses: Project-format contexts and the model responses to them.
        detector: Optional :class:`safealign.eval.scorers.Scorer`; nan scores are not rewritten.
        threshold: Flag when score >= threshold (the evaluation's convention).
        **generation: :func:`generate_rewrites` settings (batch_size, max_length, ...).

    Returns:
        RewriteResult; rewritten responses follow the project convention (leading space).
    """
    if len(contexts) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(contexts)} contexts")
    scores = None
    flagged = np.ones(len(responses), dtype=bool)
    if detector is not None:
        scores = np.asarray(detector.score(list(responses), list(contexts)), dtype=float)
        if scores.shape != (len(responses),):
            raise ValueError(
                f"detector returned shape {scores.shape} for {len(responses)} responses"
            )
        flagged = np.isfinite(scores) & (scores >= threshold)
    idx = np.flatnonzero(flagged)
    outs = generate_rewrites(
        model, tokenizer, [rephrase_input(contexts[i], responses[i]) for i in idx], **generation
    )
    new, rewritten, n_empty = list(responses), np.zeros(len(responses), dtype=bool), 0
    for i, text in zip(idx.tolist(), outs, strict=True):
        if not text.strip():
            n_empty += 1  # an empty reply is no rewrite: keep the original
            continue
        new[i], rewritten[i] = as_response(text), True
    n_unscored = 0 if scores is None else int((~np.isfinite(scores)).sum())
    return RewriteResult(new, rewritten, scores, n_unscored, n_empty)
