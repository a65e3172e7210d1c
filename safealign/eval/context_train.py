"""Training data, embeddings and the content-keyed cache of the context scorer (docs/scorers.md).

Sources (more than one, so the head does not learn one corpus's quirks): the built-in corpus
(always available; unsafe = 1, safe and evasive = 0) and DiaSafety train/val under
``<data_dir>/diasafety`` when present (skipped with a warning otherwise: a fresh clone elsewhere
has no ``../shared/data``). Train splits fit the head, val splits calibrate it and pick its
threshold (:func:`safealign.eval.context_head.fit_head`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from safealign.cache import NPZ, FileCache, content_key
from safealign.data.builtin import BuiltinSpec
from safealign.data.chat import dialogue_turns
from safealign.data.sources import load_diasafety
from safealign.errors import ConfigError
from safealign.eval.context_head import FEATURES, Head, fit_head, head_problem, pair_features
from safealign.io import file_sha256
from safealign.isaac.encoder import Encoder, embed_cached
from safealign.types import UNSAFE

log = logging.getLogger(__name__)
KEY = "scorer.toxicity"  # config node the errors name
VERSION = "context-scorer:v1"  # bump when training changes in a way the settings do not show
DIASAFETY_CATEGORIES = (
    "Toxicity Agreement", "Unauthorized Expertise", "Biased Opinion", "Risk Ignorance",
    "Offending User",
)  # fmt: skip
_CACHE = FileCache(NPZ, "context scorer head", "retraining it")


@dataclass(frozen=True)
class TrainSpec:
    """What determines the trained head (with the encoder and the DiaSafety files).

    Attributes:
        builtin: :class:`BuiltinSpec` fields of the built-in training corpus.
        diasafety: use DiaSafety train/val when ``<data_dir>/diasafety`` exists.
        exclude_categories: DiaSafety categories left out of training (transfer tests).
        context_turns: the last N dialogue turns of the context that the encoder sees.
        c_grid: inverse L2 strengths tried; the best validation AUROC wins.
        seed: the logistic regression's random_state.
    """

    builtin: dict = field(default_factory=dict)
    diasafety: bool = True
    exclude_categories: tuple[str, ...] = ()
    context_turns: int = 2
    c_grid: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            BuiltinSpec(**self.builtin)
        except TypeError as e:
            raise ConfigError(f"{KEY}.builtin", f"unknown field ({e})") from e
        except ConfigError as e:  # BuiltinSpec names data.*: name our key instead
            raise ConfigError(f"{KEY}.builtin.{e.key.removeprefix('data.')}", str(e)) from e
        bad = sorted(set(self.exclude_categories) - set(DIASAFETY_CATEGORIES))
        if bad:
            raise ConfigError(f"{KEY}.exclude_categories", f"{bad} not in {DIASAFETY_CATEGORIES}")
        turns = self.context_turns
        if isinstance(turns, bool) or not isinstance(turns, int) or turns < 0:
            raise ConfigError(f"{KEY}.context_turns", f"expected an integer >= 0, got {turns!r}")
        ok = all(isinstance(c, int | float) and not isinstance(c, bool) for c in self.c_grid)
        if not self.c_grid or not ok or min(self.c_grid) <= 0:
            raise ConfigError(f"{KEY}.c_grid", f"expected positive numbers, got {self.c_grid!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"{KEY}.seed", f"expected an integer, got {self.seed!r}")


@dataclass
class Labelled:
    """Parallel lists of contexts, responses, 0/1 labels (1 = unsafe) and groups (category)."""

    contexts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    def add(self, examples: Sequence, group: str | None = None) -> Labelled:
        for ex in examples:
            self.contexts.append(ex.context)
            self.responses.append(ex.response)
            self.labels.append(int(ex.label == UNSAFE))
            self.groups.append(group if group is not None else ex.topic)
        return self


def context_text(context: str, turns: int) -> str:
    """The words of the last ``turns`` dialogue turns (0: none), role tags dropped."""
    kept = dialogue_turns(context)[-turns:] if turns > 0 else []
    return "\n".join(text for _, text in kept)


def embed_pairs(
    encoder: Encoder, contexts: Sequence[str], responses: Sequence[str], turns: int,
    cache_dir: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(response, context) embeddings, Shape: (N, d) each; every distinct text encoded once."""
    ctx = [context_text(c, turns) for c in contexts]
    resp = [r.strip() for r in responses]
    uniq = sorted(set(ctx) | set(resp))
    emb = embed_cached(uniq, encoder, cache_dir) if uniq else np.zeros((0, 1), np.float32)
    index = {t: i for i, t in enumerate(uniq)}
    rows = [index[t] for t in resp], [index[t] for t in ctx]
    return emb[rows[0]].astype(np.float64), emb[rows[1]].astype(np.float64)


def diasafety_dir(data_dir: str | Path | None) -> Path | None:
    """``<data_dir>/diasafety`` if it holds the three split files, else None."""
    if data_dir is None:
        return None
    d = Path(data_dir) / "diasafety"
    return d if all((d / f"{s}.json").is_file() for s in ("train", "val", "test")) else None


def sources_key(spec: TrainSpec, data_dir: str | Path | None) -> dict:
    """What the training data are made of: the built-in spec and DiaSafety's file digests."""
    d = diasafety_dir(data_dir) if spec.diasafety else None
    digests = {s: file_sha256(d / f"{s}.json") for s in ("train", "val")} if d else None
    return {"builtin": asdict(BuiltinSpec(**spec.builtin)), "diasafety": digests}


def training_sets(spec: TrainSpec, data_dir: str | Path | None) -> tuple[Labelled, Labelled]:
    """(train, val) over every available source, every row: :func:`train_head` drops the
    ``exclude_categories`` after embedding, so every head shares one embedding cache entry."""
    corpus = BuiltinSpec(**spec.builtin).dialogues()
    train, val = Labelled().add(corpus.train, "builtin"), Labelled().add(corpus.val, "builtin")
    d = diasafety_dir(data_dir) if spec.diasafety else None
    if spec.diasafety and d is None:
        log.warning("context scorer: no DiaSafety under %s; training on the built-in corpus "
                    "only (a weaker scorer on real dialogue)", data_dir)  # fmt: skip
    if d is not None:
        dia = load_diasafety(d)
        train.add(dia.train)
        val.add(dia.val)
    return train, val


def train_head(
    spec: TrainSpec, encoder: Encoder, data_dir: str | Path | None,
    cache_dir: str | Path | None = None,
) -> Head:  # fmt: skip
    """Load the sources, embed them (cached by content in ``cache_dir``) and fit the head."""
    start = time.perf_counter()
    train, val = training_sets(spec, data_dir)
    xy = []
    for part in (train, val):
        r, c = embed_pairs(encoder, part.contexts, part.responses, spec.context_turns, cache_dir)
        keep = np.array([g not in spec.exclude_categories for g in part.groups])
        xy += [pair_features(r[keep], c[keep]), np.asarray(part.labels)[keep]]
    sources = sorted(set(train.groups) - set(DIASAFETY_CATEGORIES)) + (
        ["diasafety"] if set(train.groups) & set(DIASAFETY_CATEGORIES) else []
    )
    info = {"sources": sources, "n_train": len(xy[1]), "n_val": len(xy[3]),
            "excluded": list(spec.exclude_categories)}  # fmt: skip
    head = fit_head(*xy, tuple(float(c) for c in spec.c_grid), spec.seed, info)
    head.info["train_seconds"] = round(time.perf_counter() - start, 1)
    return head


def head_key(spec: TrainSpec, encoder: Encoder, data_dir: str | Path | None) -> str:
    """Content key of a head: code version, settings, sources' content, encoder, sklearn."""
    import sklearn

    settings = asdict(spec) | {"features": FEATURES}
    return content_key(VERSION, settings, sources_key(spec, data_dir), encoder.fingerprint,
                       sklearn.__version__)  # fmt: skip


def load_or_train(
    spec: TrainSpec, encoder: Encoder, data_dir: str | Path | None,
    artifacts_dir: str | Path | None, cache_dir: str | Path | None = None,
) -> Head:  # fmt: skip
    """The head for ``spec``: read from ``<artifacts_dir>/context_scorer/head-<key>.npz`` when a
    verified entry exists, else trained and written there (artifacts_dir None: not cached)."""
    key = head_key(spec, encoder, data_dir)
    path = Path(artifacts_dir) / "context_scorer" / f"head-{key}.npz" if artifacts_dir else None
    arrays = _CACHE.get_or_compute(
        path, key, lambda: train_head(spec, encoder, data_dir, cache_dir).to_arrays(),
        head_problem,
    )  # fmt: skip
    head = Head.from_arrays(arrays)
    log.info("context scorer head %s: %s", path or "(not cached)", head.info)
    return head
