"""Built-in synthetic corpus: determinism, splits, exact label counts, record shape, preference
triples, argument errors, and the ISAAC cluster-size assumption (docs/methods.md B.1/B.2)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from safealign.data.builtin import (
    BuiltinSpec,
    builtin_preferences,
    generate_builtin,
    label_counts,
)
from safealign.data.builtin_templates import EVASIVE_FAMILY, TOPICS, UNSAFE_FAMILY
from safealign.data.triples import preference_triples
from safealign.errors import ConfigError
from safealign.types import EVASIVE, SAFE, UNKNOWN, UNSAFE, DialogueExample

TOPIC_FAMILIES = {t.name: set(t.families) for t in TOPICS}


@pytest.fixture(scope="module")
def corpus():
    return generate_builtin(size=2000, seed=0)


def _all(c):
    return c.train + c.val + c.test


def test_same_seed_same_corpus_other_seed_differs(corpus):
    again = generate_builtin(size=2000, seed=0)
    assert again.train == corpus.train and again.val == corpus.val and again.test == corpus.test
    assert [e.meta for e in again.train] == [e.meta for e in corpus.train]  # meta has compare=False
    other = generate_builtin(size=2000, seed=1)
    assert other.train != corpus.train
    assert {e.context for e in other.train} != {e.context for e in corpus.train}


def test_split_sizes_exact_and_contexts_disjoint(corpus):
    assert (len(corpus.train), len(corpus.val), len(corpus.test)) == (1700, 100, 200)
    assert corpus.name == "builtin"
    train, val, test = ({e.context for e in s} for s in (corpus.train, corpus.val, corpus.test))
    assert not (train & val) and not (train & test) and not (val & test)
    empty = generate_builtin(size=50, val_fraction=0.0, test_fraction=0.0)
    assert (len(empty.train), len(empty.val), len(empty.test)) == (50, 0, 0)


@pytest.mark.parametrize(
    "size,poison,evasive", [(2000, 0.04, 0.08), (1000, 0.3, 0.08), (137, 0.1, 0.0), (40, 0.0, 0.5)]
)
def test_label_counts_are_exact(size, poison, evasive):
    c = generate_builtin(size=size, poison_fraction=poison, evasive_fraction=evasive, seed=3)
    counts = label_counts(_all(c))
    assert counts[UNSAFE] == round(poison * size)
    assert counts[EVASIVE] == round(evasive * size)
    assert counts[SAFE] == size - counts[UNSAFE] - counts[EVASIVE] and counts[UNKNOWN] == 0
    for split in (c.val, c.test):  # val/test by rounding; train takes the exact remainder
        assert label_counts(split)[UNSAFE] == round(poison * len(split))
        assert label_counts(split)[EVASIVE] == round(evasive * len(split))


def test_every_example_is_well_formed(corpus):
    for ex in _all(corpus):
        assert ex.source == "builtin" and ex.label in (SAFE, UNSAFE, EVASIVE)
        assert ex.context.startswith("\n\nHuman: ") and ex.context.endswith("\n\nAssistant:")
        assert ex.context.count("\n\nHuman:") in (1, 2)
        assert ex.response.startswith(" ") and ex.response == ex.response.rstrip()
        assert 8 <= len(ex.response.split()) <= 30, ex.response
        assert "{" not in ex.context + ex.response  # every slot was filled
        family = ex.meta["family"]
        expected = {UNSAFE: {UNSAFE_FAMILY}, EVASIVE: {EVASIVE_FAMILY}}.get(ex.label)
        assert family in (expected or TOPIC_FAMILIES[ex.topic])
    ids: dict[str, str] = {}
    for ex in _all(corpus):  # context_id identifies the context text, one to one
        assert ids.setdefault(ex.meta["context_id"], ex.context) == ex.context
    assert len(ids) == len({ex.context for ex in _all(corpus)})
    assert {ex.topic for ex in _all(corpus)} == set(TOPIC_FAMILIES)
    assert any(ex.context.count("\n\nHuman:") == 2 for ex in corpus.train)


def test_templates_have_enough_topics_and_families():
    assert len(TOPICS) >= 8
    for topic in TOPICS:
        assert len(topic.families) >= 3 and len(topic.questions) >= 5
        assert all(len(texts) >= 3 for texts in topic.families.values())


def test_num_topics_restricts_topics():
    c = generate_builtin(size=300, num_topics=3)
    assert {e.topic for e in _all(c)} == {t.name for t in TOPICS[:3]}


def test_label_counts_helper():
    exs = [DialogueExample("c", " r", lab) for lab in (SAFE, SAFE, UNSAFE, "other")]
    assert label_counts(exs) == {SAFE: 2, UNSAFE: 1, EVASIVE: 0, UNKNOWN: 0, "other": 1}


def _by_label(examples):
    out: dict[str, set[str]] = {SAFE: set(), UNSAFE: set(), EVASIVE: set()}
    for ex in examples:
        out[ex.label].add(ex.response)
    return out


def test_preference_triples_invariants(corpus):
    triples = preference_triples(corpus.train, seed=0)
    responses = _by_label(corpus.train)
    assert len(triples) == len({e.meta["context_id"] for e in corpus.train})
    assert {t.prompt for t in triples} == {e.context for e in corpus.train}
    for t in triples:
        assert t.chosen in responses[SAFE] and t.toxic in responses[UNSAFE]
        assert t.rejected in responses[UNSAFE] | responses[EVASIVE] and t.chosen != t.rejected
        assert t.source == "builtin"
    assert preference_triples(corpus.train, seed=0) == triples
    assert preference_triples(corpus.train, seed=1) != triples


def test_preference_triples_prefer_the_contexts_own_responses():
    ctx = "\n\nHuman: q\n\nAssistant:"
    dialogues = [
        DialogueExample(ctx, " own safe", SAFE, "t", "x", {"context_id": "a"}),
        DialogueExample(ctx, " own insult", UNSAFE, "t", "x", {"context_id": "a"}),
        DialogueExample("\n\nHuman: p\n\nAssistant:", " other", SAFE, "t", "x", {}),
        DialogueExample("\n\nHuman: z\n\nAssistant:", " refusal", EVASIVE, "u", "x", {}),
    ]
    first, second, _ = preference_triples(dialogues, rejected="unsafe")
    assert (first.chosen, first.rejected, first.toxic) == (
        " own safe",
        " own insult",
        " own insult",
    )
    assert (second.chosen, second.rejected) == (" other", " own insult")  # borrowed, same topic
    third = preference_triples(dialogues, rejected="evasive")[0]
    assert third.rejected == " refusal"  # no evasive in topic "t": borrowed from any topic


@pytest.mark.parametrize("rejected,labels", [("unsafe", {UNSAFE}), ("evasive", {EVASIVE})])
def test_preference_triples_rejected_choice(corpus, rejected, labels):
    responses = _by_label(corpus.train)
    allowed = set().union(*(responses[lab] for lab in labels))
    assert all(t.rejected in allowed for t in preference_triples(corpus.train, rejected=rejected))


def test_preference_triples_without_unsafe():
    c = generate_builtin(size=200, poison_fraction=0.0)
    triples = preference_triples(c.train)
    assert triples and all(t.toxic is None for t in triples)
    with pytest.raises(ConfigError, match="data.poison_fraction"):
        preference_triples(c.train, rejected="unsafe")
    with pytest.raises(ConfigError, match="data.rejected"):
        preference_triples(c.train, rejected="toxic")


def test_builtin_preferences_splits(corpus):
    prefs = builtin_preferences(size=2000, seed=0)
    assert prefs.name == "builtin" and prefs.train and prefs.val and prefs.test
    assert {t.prompt for t in prefs.test} == {e.context for e in corpus.test}
    assert not {t.prompt for t in prefs.test} & {t.prompt for t in prefs.train}
    assert all(t.toxic is not None for t in prefs.train + prefs.val + prefs.test)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"size": 5}, "data.size"),
        ({"size": 2000.0}, "data.size"),
        ({"poison_fraction": 1.0}, "data.poison_fraction"),
        ({"poison_fraction": -0.1}, "data.poison_fraction"),
        ({"poison_fraction": float("nan")}, "data.poison_fraction"),
        ({"evasive_fraction": "0.1"}, "data.evasive_fraction"),
        ({"poison_fraction": 0.6, "evasive_fraction": 0.4}, "data.evasive_fraction"),
        ({"seed": -1}, "data.seed"),
        ({"val_fraction": 1.5}, "data.val_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "data.test_fraction"),
        ({"num_topics": 0}, "data.num_topics"),
        ({"num_topics": len(TOPICS) + 1}, "data.num_topics"),
    ],
)
def test_bad_arguments_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        generate_builtin(**kwargs)
    assert err.value.key == key and key in str(err.value)
    with pytest.raises(ConfigError, match=key):  # the spec checks itself, whoever builds it
        BuiltinSpec(**kwargs)


def test_spec_is_the_one_signature_of_every_entry_point():
    spec = BuiltinSpec(size=300, poison_fraction=0.1, seed=2)
    assert spec == BuiltinSpec(300, 0.1, 0.08, 2) and hash(spec) == hash(BuiltinSpec(300, 0.1, seed=2))
    dialogues = generate_builtin(300, 0.1, 0.08, 2)  # positional in field order, as before
    assert spec.dialogues() == dialogues and spec.dialogues().test == dialogues.test
    prefs = builtin_preferences(size=300, poison_fraction=0.1, seed=2, rejected="unsafe")
    assert spec.preferences("unsafe") == prefs
    with pytest.raises(TypeError, match="sise"):
        BuiltinSpec(sise=300)  # a misspelt config key fails where the spec is built
    with pytest.raises(AttributeError):
        spec.size = 5  # frozen: one spec, one corpus


# ISAAC's unsupervised premise (docs/methods.md B.1, B.2 steps 3-8): among the responses of a context's
# neighbourhood the LARGEST clusters are safe. The corpus is built so that this holds at poison 0.04
# and fails at 0.3; these tests check it with TF-IDF and (label, family) groups instead of DBSCAN.


def _tfidf(texts_fit, *texts):
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer().fit(texts_fit)
    return [vec.transform(t) for t in texts]  # rows are L2-normalised: X @ X.T is cosine


def test_unsafe_responses_form_their_own_tight_group():
    c = generate_builtin(size=2000, poison_fraction=0.04, seed=0)
    (x,) = _tfidf([e.response for e in c.train], [e.response for e in c.train])
    labels = np.array([e.label for e in c.train])
    topics = np.array([e.topic for e in c.train])
    for topic in TOPIC_FAMILIES:
        idx = np.flatnonzero(topics == topic)
        sims = (x[idx] @ x[idx].T).toarray()
        np.fill_diagonal(sims, np.nan)
        unsafe, safe = labels[idx] == UNSAFE, labels[idx] == SAFE
        uu = np.nanmean(sims[np.ix_(unsafe, unsafe)])
        us = np.nanmean(sims[np.ix_(unsafe, safe)])
        assert uu > 0.5 and uu > 10 * us, (topic, uu, us)
        nearest = np.nanargmax(sims[unsafe], axis=1)  # each unsafe response's nearest neighbour
        assert np.mean(labels[idx][nearest] == UNSAFE) >= 0.9


def _largest_groups(poison, size=2000):
    c = generate_builtin(size=size, poison_fraction=poison, seed=0)
    groups: dict[str, Counter] = {}
    for e in c.train:
        groups.setdefault(e.topic, Counter())[(e.label, e.meta["family"])] += 1
    return {topic: counts.most_common(1)[0][0] for topic, counts in groups.items()}


def test_largest_family_is_safe_at_low_poison_and_unsafe_at_high_poison():
    low = _largest_groups(0.04)
    assert all(label == SAFE for label, _ in low.values()), low
    high = _largest_groups(0.3)
    assert sum(key == (UNSAFE, UNSAFE_FAMILY) for key in high.values()) >= 0.75 * len(high), high


@pytest.mark.parametrize("poison,unsafe_wins", [(0.04, False), (0.3, True)])
def test_context_neighbourhoods_follow_the_same_pattern(poison, unsafe_wins):
    """K=150 nearest contexts by cosine (B.2 step 3), then the biggest (label, family) group."""
    c = generate_builtin(size=3000, poison_fraction=poison, seed=1)
    contexts = [e.context for e in c.train]
    (x,) = _tfidf(contexts, contexts)
    queries = np.random.default_rng(0).choice(len(contexts), size=100, replace=False)
    sims = (x[queries] @ x.T).toarray()
    neighbours = np.argsort(-sims, axis=1)[:, :150]
    same_topic = [
        c.train[j].topic == c.train[q].topic
        for q, row in zip(queries, neighbours, strict=True)
        for j in row
    ]
    # Mostly same-topic neighbours even for TF-IDF, which does not stem (cook/cooking/cooked).
    assert np.mean(same_topic) > 0.6
    wins = []
    for row in neighbours:
        groups = Counter((c.train[j].label, c.train[j].meta["family"]) for j in row)
        wins.append(groups.most_common(1)[0][0][0] == UNSAFE)
    assert np.mean(wins) > 0.7 if unsafe_wins else np.mean(wins) < 0.05


def test_profanity_classifier_separates_unsafe_from_safe(corpus):
    profanity_check = pytest.importorskip("profanity_check")
    labels = (SAFE, UNSAFE, EVASIVE)
    by_label = {lab: [e.response for e in corpus.train if e.label == lab] for lab in labels}
    prob = {lab: float(np.mean(profanity_check.predict_prob(t))) for lab, t in by_label.items()}
    assert prob[UNSAFE] > 0.9 and prob[SAFE] < 0.15 and prob[EVASIVE] < 0.15, prob
