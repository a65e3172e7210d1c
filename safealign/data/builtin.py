"""Built-in synthetic dialogue corpus (``data=builtin``): seeded, labelled, fast, offline.

Every example carries its hidden label, topic, ``context_id`` (hash of the context text) and
response ``family``, so evaluation rates are exact. Per topic, safe responses are spread uniformly
over four paraphrase families while unsafe ones form ONE insult family, so the unsafe family is a
topic's largest once poison > (1 - poison - evasive) / 4 (poison > ~0.18 at evasive 0.08): ISAAC's
"largest response clusters are safe" assumption (docs/methods.md B.1, B.2 steps 4-8) holds at poison
0.04 and 0.1 and fails at 0.3. Templates and word lists live in ``builtin_templates.py``.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from safealign.data import builtin_templates as bt
from safealign.data.triples import preference_triples
from safealign.errors import ConfigError
from safealign.io import stable_hash
from safealign.types import (
    EVASIVE,
    LABELS,
    SAFE,
    UNSAFE,
    Corpus,
    DialogueExample,
    as_response,
    chat_prompt,
)

SOURCE = "builtin"
TWO_TURN_FRACTION = 0.2  # share of contexts that open with a greeting exchange before the question
_MAX_SLOTS = 4  # most slot fields in any one template (checked when templates are compiled)
_Template = tuple[str, tuple[tuple[str, ...], ...]]  # (positional format string, slot fillers)
_OTHER_FAMILY = {UNSAFE: bt.UNSAFE_FAMILY, EVASIVE: bt.EVASIVE_FAMILY}


def _compile(texts: Sequence[str], slots: dict[str, tuple[str, ...]]) -> tuple[_Template, ...]:
    """Named slots -> positional ``{0}``, ``{1}``... bound to their fillers (fast ``format``)."""
    out = []
    for text in texts:
        parts, options = [], []
        for literal, name, _, _ in string.Formatter().parse(text):
            parts.append(literal.replace("{", "{{").replace("}", "}}"))
            if name is not None:
                parts.append(f"{{{len(options)}}}")
                options.append(slots[name])  # KeyError at import if a template names no slot
        if len(options) > _MAX_SLOTS:
            raise ValueError(f"template {text!r} has more than {_MAX_SLOTS} slots")
        out.append(("".join(parts), tuple(options)))
    return tuple(out)


def _compile_topic(t: bt.Topic) -> dict:
    texts = {"questions": t.questions, "openers": bt.OPENERS}
    texts |= {UNSAFE: bt.UNSAFE_TEMPLATES, EVASIVE: bt.EVASIVE_TEMPLATES}
    compiled = {kind: _compile(v, t.slots) for kind, v in texts.items()}
    families = tuple((name, _compile(v, t.slots)) for name, v in t.families.items())
    return {"name": t.name, "families": families, **compiled}


_COMPILED = tuple(_compile_topic(t) for t in bt.TOPICS)  # once at import; generation only formats


def _pick(options: Sequence, u: float):
    return options[int(u * len(options))]  # u in [0, 1): a uniform draw mapped to an index


def _fill(template: _Template, us: Sequence[float]) -> str:
    text, options = template
    return text.format(*[_pick(o, u) for o, u in zip(options, us, strict=False)])


def _check_int(key: str, value: object, low: int, high: float = float("inf")) -> int:
    is_int = isinstance(value, int | np.integer) and not isinstance(value, bool)
    if not is_int or not low <= value <= high:
        raise ConfigError(key, f"expected an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _check_fraction(key: str, value: object) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value < 1.0
    if not ok:  # also rejects NaN, for which every comparison is False
        raise ConfigError(key, f"expected a number in [0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class BuiltinSpec:
    """What identifies a built-in corpus: the same spec gives the same corpus, bit for bit.

    The fields are the config keys (``data.source.*``, ``eval_set.*``, the ground-truth scorer's),
    so every entry point builds its spec from them; the eval sets must use the training run's.

    Attributes:
        size: total dialogues over all splits (>= 10).
        poison_fraction: share of unsafe (insult) responses; exactly round(poison_fraction*size).
        evasive_fraction: share of evasive (refusal) responses; exactly round(that * size).
        seed: seeds a private ``np.random.default_rng``; same seed, same corpus.
        val_fraction: share of dialogues in val; contexts never cross splits.
        test_fraction: share of dialogues in test.
        num_topics: use only the first ``num_topics`` topics (None: all eight).

    Raises:
        ConfigError: naming the ``data.*`` key of an out-of-range field.
    """

    size: int = 2000
    poison_fraction: float = 0.04
    evasive_fraction: float = 0.08
    seed: int = 0
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    num_topics: int | None = None

    def __post_init__(self) -> None:
        size, _ = _check_int("data.size", self.size, 10), _check_int("data.seed", self.seed, 0)
        p = _check_fraction("data.poison_fraction", self.poison_fraction)
        e = _check_fraction("data.evasive_fraction", self.evasive_fraction)
        if p + e >= 1.0 or round(p * size) + round(e * size) >= size:
            msg = f"poison ({p}) + evasive ({e}) must leave some of the {size} responses safe"
            raise ConfigError("data.evasive_fraction", msg)
        v = _check_fraction("data.val_fraction", self.val_fraction)
        t = _check_fraction("data.test_fraction", self.test_fraction)
        if size - round(v * size) - round(t * size) < 1:
            msg = f"val ({v}) + test ({t}) leave no training data"
            raise ConfigError("data.test_fraction", msg)
        if self.num_topics is not None:
            _check_int("data.num_topics", self.num_topics, 1, len(_COMPILED))

    @property
    def topics(self) -> tuple[dict, ...]:
        return _COMPILED if self.num_topics is None else _COMPILED[: int(self.num_topics)]

    def dialogues(self) -> Corpus:
        return builtin_dialogues(self)

    def preferences(self, rejected: str = "unsafe_or_evasive") -> Corpus:
        return preference_corpus(self, rejected)


def _uniform_rows(rng: np.random.Generator, n: int, width: int):
    """n rows of ``width`` U[0,1) draws from one bulk call. Column lists, not ``.tolist()`` of the
    matrix: n live small lists set off many garbage-collector passes (4x slower at 160k rows)."""
    return zip(*[col.tolist() for col in rng.random((width, n))], strict=True)


def _contexts(size: int, topics: tuple[dict, ...], rng: np.random.Generator):
    """Balanced topics in random order. Draws per row: question, two-turn flag, greeting, its
    slot, reply, question slots. Greetings name the topic's area so they add topical words."""
    topic_ids = rng.permutation(np.arange(size) % len(topics)).tolist()
    contexts = []
    for tid, u in zip(topic_ids, _uniform_rows(rng, size, 5 + _MAX_SLOTS), strict=True):
        topic = topics[tid]
        turns = [_fill(_pick(topic["questions"], u[0]), u[5:])]
        if u[1] < TWO_TURN_FRACTION:
            turns[:0] = [_fill(_pick(topic["openers"], u[2]), u[3:4]), _pick(bt.ACKS, u[4])]
        contexts.append(chat_prompt(turns))
    return topic_ids, contexts


def _split_by_context(contexts: list[str], n_val: int, n_test: int, rng: np.random.Generator):
    """Disjoint train/val/test index lists; identical contexts always share a split (no leakage)."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(contexts):
        groups.setdefault(c, []).append(i)
    members = list(groups.values())
    train, val, test = [], [], []
    for g in rng.permutation(len(members)).tolist():
        grp = members[g]
        if len(test) + len(grp) <= n_test:
            test += grp
        elif len(val) + len(grp) <= n_val:
            val += grp
        else:
            train += grp
    return [[s[j] for j in rng.permutation(len(s)).tolist()] for s in (train, val, test)]


def _label_plan(sizes: list[int], total: int, p: float, e: float) -> list[tuple[int, int]]:
    """(unsafe, evasive) count per split: val/test by rounding, train gets the exact remainder."""
    plan = []
    for n in sizes[1:]:
        u = min(round(p * n), n)
        plan.append((u, min(round(e * n), n - u)))
    u_train = min(max(round(p * total) - sum(u for u, _ in plan), 0), sizes[0])
    e_train = min(max(round(e * total) - sum(v for _, v in plan), 0), sizes[0] - u_train)
    return [(u_train, e_train), *plan]


def _response(topic: dict, label: str, u: list[float]) -> tuple[str, str]:
    if label == SAFE:
        family, templates = _pick(topic["families"], u[0])
    else:
        family, templates = _OTHER_FAMILY[label], topic[label]
    return as_response(_fill(_pick(templates, u[1]), u[2:])), family


def _dialogues(index, counts, topic_ids, contexts, topics, ids, rng) -> list[DialogueExample]:
    n_unsafe, n_evasive = counts
    n_safe = len(index) - n_unsafe - n_evasive
    ordered = [UNSAFE] * n_unsafe + [EVASIVE] * n_evasive + [SAFE] * n_safe
    labels = [ordered[j] for j in rng.permutation(len(ordered)).tolist()]
    out = []
    rows = _uniform_rows(rng, len(index), 2 + _MAX_SLOTS)
    for i, label, u in zip(index, labels, rows, strict=True):
        topic = topics[topic_ids[i]]
        response, family = _response(topic, label, u)
        context = contexts[i]
        cid = ids.get(context) or ids.setdefault(context, stable_hash(context, length=12))
        meta = {"context_id": cid, "family": family}
        out.append(DialogueExample(context, response, label, topic["name"], SOURCE, meta))
    return out


def builtin_dialogues(spec: BuiltinSpec) -> Corpus:
    """Generate the labelled synthetic dialogue corpus ``spec`` describes.

    Returns:
        Corpus(train, val, test, name="builtin") of DialogueExample with source "builtin" and
        meta {"context_id": hash of the context text, "family": response family}.
    """
    size = int(spec.size)
    rng = np.random.default_rng(int(spec.seed))
    topic_ids, contexts = _contexts(size, spec.topics, rng)
    n_val, n_test = round(spec.val_fraction * size), round(spec.test_fraction * size)
    splits = _split_by_context(contexts, n_val, n_test, rng)
    plan = _label_plan([len(s) for s in splits], size, spec.poison_fraction, spec.evasive_fraction)
    shared = (topic_ids, contexts, spec.topics, {}, rng)  # {}: context -> context_id, hashed once
    train, val, test = (_dialogues(s, c, *shared) for s, c in zip(splits, plan, strict=True))
    return Corpus(train=train, val=val, test=test, name=SOURCE)


def generate_builtin(*spec: Any, **fields: Any) -> Corpus:
    """The ``data.source`` target of ``data=builtin``: :class:`BuiltinSpec` fields (positional in
    field order, or by name) -> the dialogue corpus."""
    return BuiltinSpec(*spec, **fields).dialogues()


def label_counts(examples: Sequence[DialogueExample]) -> dict[str, int]:
    """Count examples per label: every label in ``LABELS`` (zeros included), plus any other seen."""
    counts = Counter(ex.label for ex in examples)
    return {**{lab: 0 for lab in LABELS}, **counts}


def preference_corpus(spec: BuiltinSpec, rejected: str = "unsafe_or_evasive") -> Corpus:
    """The built-in corpus as preference triples for DPO/ADPO (see :func:`preference_triples`).

    Splits borrow missing responses from themselves and train, never from val/test into train.
    """
    corpus = builtin_dialogues(spec)
    splits = []
    for i, split in enumerate((corpus.train, corpus.val, corpus.test)):
        split_seed = int(np.random.SeedSequence([int(spec.seed), i]).generate_state(1)[0])
        pool = split if i == 0 else corpus.train + split
        splits.append(preference_triples(split, split_seed, rejected, pool))
    return Corpus(train=splits[0], val=splits[1], test=splits[2], name=SOURCE)


def builtin_preferences(*spec: Any, rejected: str = "unsafe_or_evasive", **fields: Any) -> Corpus:
    """The ``data.source`` target of ``data=builtin_pref``: :class:`BuiltinSpec` fields and
    ``rejected`` (as :func:`preference_triples`) -> the preference corpus."""
    return BuiltinSpec(*spec, **fields).preferences(rejected)
