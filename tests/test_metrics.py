"""Metrics on toy inputs with hand-derived expected values (docs/methods.md B.7)."""

from __future__ import annotations

import math

import pytest

from safealign.eval.metrics import (
    avg_length,
    bleu4,
    distinct_n,
    dpr,
    evasiveness_rate,
    expected_max_toxicity,
    ngram_entropy,
    rpr,
    safety_score,
    toxic_prompts,
    toxicity_probability,
    toxicity_rate,
)

NAN = float("nan")


def test_toxicity_rate_threshold_inclusive_and_skips_nan():
    # 0.5 and 0.9 are >= 0.5 out of 3 finite scores -> 2/3
    assert toxicity_rate([0.1, 0.5, 0.9, NAN]) == pytest.approx(2 / 3)
    assert toxicity_rate([0.1, 0.5, 0.9], threshold=0.95) == 0.0
    assert math.isnan(toxicity_rate([]))
    assert math.isnan(toxicity_rate([NAN]))


def test_toxicity_probability_counts_prompts_not_samples():
    # 3 prompts x 2 samples: prompt 0 has one toxic sample, prompt 1 none, prompt 2 both.
    per_prompt = [[0.9, 0.1], [0.2, 0.3], [0.6, 0.7]]
    assert toxicity_probability(per_prompt) == pytest.approx(2 / 3)  # prompts 0 and 2
    flat = [s for p in per_prompt for s in p]
    assert toxicity_rate(flat) == pytest.approx(3 / 6)  # the per-sample rate differs
    # NaN samples are skipped; a prompt with no finite sample is left out (1 of 2 prompts)
    assert toxic_prompts([[NAN, 0.5], [NAN], [0.1]]) == [True, False]
    assert toxicity_probability([[NAN, 0.5], [NAN], [0.1]]) == 0.5
    assert toxicity_probability([[0.4, 0.6]], threshold=0.7) == 0.0
    assert math.isnan(toxicity_probability([]))


def test_expected_max_toxicity_is_mean_of_per_prompt_max():
    # maxima 0.7, 0.2, 0.9 -> mean 0.6
    assert expected_max_toxicity([[0.1, 0.7], [0.2], [0.9, 0.3, NAN]]) == pytest.approx(0.6)
    # an all-nan prompt is skipped: maxima 0.4 only
    assert expected_max_toxicity([[0.4], [NAN, NAN]]) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="prompt 1"):
        expected_max_toxicity([[0.1], []])


def test_safety_score_and_evasiveness():
    assert safety_score([1, 0, 0, 0]) == pytest.approx(0.75)  # 1 - 1/4
    assert safety_score([True, True]) == 0.0
    assert evasiveness_rate([1, 1, 0]) == pytest.approx(2 / 3)
    assert math.isnan(safety_score([]))


def test_distinct_n_pooled_and_within_text():
    # unigrams a b a b c: 3 distinct / 5
    assert distinct_n(["a b a", "b c"], 1) == pytest.approx(0.6)
    # bigrams (a b) (b a) (b c): all distinct
    assert distinct_n(["a b a", "b c"], 2) == pytest.approx(1.0)
    # two identical texts: bigram (a b) twice -> 1/2; a cross-text (b a) would give 2/3
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(0.5)
    assert math.isnan(distinct_n(["a", "b"], 2))
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


def test_ngram_entropy_natural_log():
    # two distinct 4-grams once each -> ln 2
    assert ngram_entropy(["a b c d e"]) == pytest.approx(math.log(2))
    # counts (2, 1) -> -(2/3 ln 2/3 + 1/3 ln 1/3) = 0.636514...
    assert ngram_entropy(["a b c d", "a b c d", "w x y z"]) == pytest.approx(0.6365141682948128)
    assert ngram_entropy(["a a b"], n=1) == pytest.approx(0.6365141682948128)
    assert ngram_entropy(["too short"]) == 0.0


def test_avg_length_whitespace_tokens():
    assert avg_length(["a b", "c  d\te", ""]) == pytest.approx(5 / 3)
    assert math.isnan(avg_length([]))


def test_bleu4_hand_computed():
    # p1..p4 = 5/6, 3/5, 2/4, 1/3; equal lengths so BP = 1: (1/12) ** 0.25 = 0.537285
    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    assert bleu4([hyp], [ref]) == pytest.approx((1 / 12) ** 0.25, abs=1e-6)
    assert bleu4([hyp.upper()], [ref]) == pytest.approx((1 / 12) ** 0.25, abs=1e-6)
    assert bleu4([hyp.upper()], [ref], lowercase=False) < 0.05
    assert bleu4([hyp, ref], [[ref, "x"], [ref, "y"]]) > bleu4([hyp, ref], [["x"], ["y"]])
    assert bleu4([ref], [ref]) == pytest.approx(1.0)


def test_bleu4_no_refs_and_bad_refs():
    assert bleu4(["a"], None) is None
    assert bleu4(["a"], []) is None
    with pytest.raises(ValueError, match="2 hypotheses"):
        bleu4(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="same"):
        bleu4(["a", "b"], [["a"], ["b", "c"]])


def test_rpr_dpr_hand_computed():
    responses = ["Fuck, sure.", "Hello there", "I HATE this", "shellfish please"]
    # polluted: "Fuck" and "HATE" (case-insensitive); "Hello"/"shellfish" are not the word "hell"
    assert rpr(responses) == pytest.approx(0.5)
    dialogues = [["fine", "go to hell."], ["fine"], ["ok", "sure"]]
    assert dpr(dialogues) == pytest.approx(1 / 3)
    assert rpr(["a banana", "apple"], lexicon=["banana"]) == pytest.approx(0.5)
    assert dpr([["shut up now"], ["shutup"]], lexicon=["shut up"]) == pytest.approx(0.5)
    assert math.isnan(rpr([]))
