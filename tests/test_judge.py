"""Annotation judges (safealign/annotate/) with fake scorers on hand-built rows."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from safealign.annotate.classifier import ClassifierJudge
from safealign.annotate.hf import hf_generate_fn
from safealign.annotate.llm import LLMJudge, parse_verdict
from safealign.annotate.rows import load_judgements, save_judgements
from safealign.errors import ConfigError, DataError
from safealign.types import PreferenceExample, chat_prompt


class TableScorer:
    """Fake Scorer: looks each response up in a table (unknown text -> default)."""

    def __init__(self, name: str, table: dict[str, float], default: float = 0.0):
        self.name, self.table, self.default, self.calls = name, table, default, []

    def score(self, responses, contexts=None):
        self.calls.append(list(responses))
        return np.array([self.table.get(r, self.default) for r in responses], dtype=float)


class LMCoherenceScorer(TableScorer):
    """Same name as the real NLL scorer: lower is more coherent."""


def row(pid, text, t=1.0, toxic=False, sample=0, prompt=None):
    return {
        "prompt_id": pid,
        "prompt": prompt or chat_prompt([f"question {pid}"]),
        "response": text,
        "temperature": t,
        "sample": sample,
        "toxic": toxic,
        "empty": text == "",
    }


def triple_rows(pid, a, b, y_t=" toxic reply"):
    rows = [row(pid, a, 1.0), row(pid, b, 1.5)]
    return rows + ([row(pid, y_t, 1.0, toxic=True)] if y_t is not None else [])


TOX = {" toxic reply": 0.9, " very toxic": 0.99, " rude normal": 0.8, " mild": 0.2}
EVA = {" I cannot help with that.": 1.0}
COH = {
    " good answer": 0.9,
    " weak answer": 0.3,
    " rude normal": 0.95,
    " I cannot help with that.": 0.99,
}


def judge(**kw) -> ClassifierJudge:
    return ClassifierJudge(
        TableScorer("tox", TOX),
        TableScorer("eva", EVA),
        kw.pop("coherence", TableScorer("coh", COH)),
        **kw,
    )


def test_picks_chosen_rejected_toxic():
    triples, stats = judge()(triple_rows(0, " weak answer", " good answer"))
    assert triples == [
        PreferenceExample(
            chat_prompt(["question 0"]),
            " good answer",
            " weak answer",
            " toxic reply",
            "adpo_classifier_judge",
        )
    ]
    assert stats["prompts"] == 1 and stats["kept"] == 1 and sum(stats["dropped"].values()) == 0
    assert stats["labels"] == {"normal": {"safe": 2}, "toxic": {"toxic": 1}}


def test_unsafe_or_evasive_never_chosen_even_if_most_coherent():
    for bad in (" rude normal", " I cannot help with that."):
        triples, _ = judge()(triple_rows(0, bad, " weak answer"))
        assert (triples[0].chosen, triples[0].rejected) == (" weak answer", bad)


def test_coherence_direction():
    # NLL-like scores: lower is more coherent.
    nll = {" good answer": 1.0, " weak answer": 5.0}
    rows = triple_rows(0, " good answer", " weak answer")
    assert (
        judge(coherence=TableScorer("c", nll), coherence_higher_is_better=False)(rows)[0][0].chosen
        == " good answer"
    )
    assert judge(coherence=LMCoherenceScorer("c", nll))(rows)[0][0].chosen == " good answer"  # auto
    assert (
        judge(coherence=TableScorer("c", nll))(rows)[0][0].chosen == " weak answer"
    )  # higher wins
    flagged = TableScorer("c", nll)
    flagged.higher_is_better = False
    assert judge(coherence=flagged)(rows)[0][0].chosen == " good answer"


def test_ties_lower_toxicity_then_lower_temperature():
    flat = TableScorer("c", {}, default=0.5)
    t, _ = judge(coherence=flat)(triple_rows(0, " mild", " good answer"))  # tox .2 vs 0
    assert t[0].chosen == " good answer"
    t, _ = judge(coherence=flat)(
        [row(0, " x", 1.5), row(0, " y", 1.0), row(0, " toxic reply", 1.0, True)]
    )
    assert (t[0].chosen, t[0].rejected) == (" y", " x")
    t, _ = judge(coherence=None)(
        [row(0, " x", 1.5), row(0, " y", 1.0), row(0, " toxic reply", 1.0, True)]
    )
    assert t[0].chosen == " y"


def test_most_toxic_of_several_and_worst_rejected_of_three():
    rows = [
        row(0, " good answer", 1.0),
        row(0, " weak answer", 1.5),
        row(0, " mild", 1.5, sample=1),
        row(0, " toxic reply", 1.0, True),
        row(0, " very toxic", 1.5, True),
    ]
    coh = TableScorer("c", {" good answer": 0.9, " mild": 0.5, " weak answer": 0.3})
    t, stats = judge(coherence=coh)(rows)
    assert (t[0].chosen, t[0].rejected, t[0].toxic) == (
        " good answer",
        " weak answer",
        " very toxic",
    )
    assert coh.calls == [[" good answer", " weak answer", " mild"]]  # coherence on normals only


@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        ([row(0, " good answer"), row(0, " toxic reply", toxic=True)], "single_normal"),
        (triple_rows(0, " good answer", ""), "empty_generation"),
        (triple_rows(0, " good answer", " weak answer", y_t=""), "empty_generation"),
        (triple_rows(0, " rude normal", " I cannot help with that."), "no_safe_normal"),
        (triple_rows(0, " good answer", "good answer "), "identical_pair"),
        (triple_rows(0, " good answer", " weak answer", y_t=None), "no_toxic_sample"),
        (triple_rows(0, " good answer", " weak answer", y_t=" mild"), "toxic_not_toxic"),
    ],
)
def test_drop_reasons(rows, reason):
    triples, stats = judge()(rows)
    assert triples == [] and stats["kept"] == 0
    assert stats["dropped"][reason] == 1 and sum(stats["dropped"].values()) == 1


def test_require_toxic_false_keeps_pair_without_toxic():
    j = judge(require_toxic=False)
    for y_t in (None, " mild"):
        t, stats = j(triple_rows(0, " good answer", " weak answer", y_t=y_t))
        assert t[0].toxic is None and stats["kept"] == 1


def test_relabel_toxic_normal():
    rows = triple_rows(0, " good answer", " rude normal", y_t=" mild")
    assert judge()(rows)[1]["dropped"]["toxic_not_toxic"] == 1
    t, stats = judge(relabel_toxic_normal=True)(rows)
    assert (t[0].chosen, t[0].rejected, t[0].toxic) == (
        " good answer",
        " rude normal",
        " rude normal",
    )
    assert stats["relabelled"] == 1


def test_nan_scores_are_never_safe_and_stats_over_many_prompts():
    tox = TableScorer("tox", TOX | {" unknown": math.nan})
    j = ClassifierJudge(tox, TableScorer("eva", EVA), TableScorer("coh", COH | {" unknown": 1.0}))
    rows = (
        triple_rows(0, " unknown", " weak answer")
        + triple_rows(1, " good answer", " weak answer")
        + triple_rows(2, " good answer", " good answer")
    )
    t, stats = j(rows)
    assert [x.chosen for x in t] == [" weak answer", " good answer"]
    assert stats["dropped"]["identical_pair"] == 1 and stats["prompts"] == 3
    assert stats["labels"]["normal"] == {"safe": 5, "unscored": 1}
    assert j.records[0]["candidates"][0]["tox"] is None  # NaN -> null in the audit trail


def test_bad_rows_and_bad_scorer():
    with pytest.raises(DataError, match="lacks keys"):
        judge()([{"prompt_id": 0, "response": " x"}])
    with pytest.raises(DataError, match="two prompts"):
        judge()([row(0, " a", prompt="p1"), row(0, " b", prompt="p2")])

    class Short(TableScorer):
        def score(self, responses, contexts=None):
            return np.zeros(1)

    with pytest.raises(ValueError, match="'short' returned 1 scores for 3"):
        ClassifierJudge(Short("short", {}), TableScorer("e", {}))(triple_rows(0, " a", " b"))
    with pytest.raises(ConfigError, match="judge.toxicity_threshold"):
        judge(toxicity_threshold=0.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("BETTER: A; TOXIC: yes", ("A", True)),
        ("better:b;toxic:NO", ("B", False)),
        ("Better: **A**\nToxic: **Yes**", ("A", True)),
        (
            "Sure! Here is my judgement.\n\nBETTER: B; TOXIC: no. Response B is more polite.",
            ("B", False),
        ),
        ("The better response is (A). TOXIC = yes", ("A", True)),
        ("## Verdict\n- **Better:** Response B\n- **Toxic:** No", ("B", False)),
        ("`BETTER: B` `TOXIC: no`", ("B", False)),
        ("better: a\ntoxic: true", ("A", True)),
        ("BETTER: NONE; TOXIC: yes", ("NONE", True)),
        (
            "Reply format BETTER: <A, B or NONE>; TOXIC: <yes or no>\nBETTER: A; TOXIC: no",
            ("A", False),
        ),
        ("BETTER: A|B; TOXIC: yes|no", (None, None)),  # the template echoed back
        ("BETTER: A or B; TOXIC: no", (None, False)),
        ("BETTER: A; BETTER: B; TOXIC: yes", (None, True)),  # conflicting answers
        ("Better: C; toxic: yes", (None, True)),
        ("BETTER: A; TOXIC: maybe", ("A", None)),
        ("This one is better: a lot more helpful. non-toxic: yes", (None, None)),
        ("I cannot help with that.", (None, None)),
        ("", (None, None)),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def fake_llm(replies_for: dict[str, str] | None = None):
    """Prefers whichever of A/B contains 'good'; C is toxic when it contains 'toxic'."""
    calls = []

    def fn(prompts):
        calls.append(list(prompts))
        out = []
        for p in prompts:
            a = re.search(r"Response A:(.*?)\n\nResponse B:", p, re.S).group(1)
            c = re.search(r"Response C:(.*?)\n\nQuestion 1", p, re.S).group(1)
            q = re.search(r"question (\d+)", p).group(1)
            default = (
                f"Better: {'A' if 'good' in a else 'B'}; toxic: {'yes' if 'toxic' in c else 'no'}"
            )
            out.append((replies_for or {}).get(q, default))
        return out

    fn.calls = calls
    return fn


def test_llm_judge_picks_and_order_randomisation():
    gen = fake_llm()
    rows = [r for pid in range(8) for r in triple_rows(pid, " weak answer", " good answer")]
    j = LLMJudge(gen)
    triples, stats = j(rows)
    assert stats["kept"] == 8 and len(gen.calls) == 1 and len(gen.calls[0]) == 8
    assert all(
        (t.chosen, t.rejected, t.toxic) == (" good answer", " weak answer", " toxic reply")
        for t in triples
    )
    assert {tuple(r["a"]) for r in j.records} == {(1.0, 0), (1.5, 0)}  # both orders shown
    assert j(rows)[0] == triples  # seeded order: same answer twice


def test_llm_judge_drops_and_invalid():
    gen = fake_llm(
        {
            "1": "I think both are fine.",
            "2": "BETTER: NONE; TOXIC: yes",
            "3": "BETTER: A; TOXIC: perhaps",
        }
    )
    rows = [r for pid in range(4) for r in triple_rows(pid, " weak answer", " good answer")]
    rows += triple_rows(4, " good answer", " weak answer", y_t=" polite")  # judged not toxic
    rows += triple_rows(5, " good answer", " good answer") + [row(6, " good answer")]
    rows += triple_rows(7, " good answer", " weak answer", y_t=None)
    triples, stats = LLMJudge(gen)(rows)
    assert stats["kept"] == 1 and stats["invalid"] == 2 and stats["prompts"] == 8
    assert stats["dropped"] == {
        "single_normal": 1,
        "empty_generation": 0,
        "no_safe_normal": 1,
        "identical_pair": 1,
        "no_toxic_sample": 1,
        "toxic_not_toxic": 1,
        "invalid_judge_output": 2,
    }
    assert len(gen.calls[0]) == 5  # prompts dropped before judging are never sent
    t, _ = LLMJudge(fake_llm(), require_toxic=False)(
        triple_rows(0, " good answer", " x", y_t=" polite")
    )
    assert t[0].toxic is None


def test_llm_template_validation():
    with pytest.raises(ConfigError, match="judge.template"):
        LLMJudge(fake_llm(), template="Dialogue {prompt} {unknown}")


def test_save_load_round_trip(tmp_path):
    triples, stats = judge()(
        triple_rows(0, " weak answer", " good answer")
        + triple_rows(1, " good answer", " weak answer", y_t=" mild")
    )
    path = tmp_path / "judged.jsonl"
    save_judgements(path, triples, stats, records=[{"prompt_id": 0}])
    assert load_judgements(path) == (triples, json.loads(json.dumps(stats)))
    assert (tmp_path / "judged.records.jsonl").exists()
    path.write_text(path.read_text() + '{"prompt": "p", "chosen": 3}\n')
    with pytest.raises(DataError, match=r"judged.jsonl:2"):
        load_judgements(path)
    with pytest.raises(DataError, match="missing"):
        load_judgements(tmp_path / "absent.jsonl")


def test_hf_generate_fn_greedy_on_tiny_model():
    import torch

    from safealign.models import build_tiny_gpt2, train_bpe_tokenizer

    tok = train_bpe_tokenizer([f"BETTER: A; TOXIC: no {i}" for i in range(50)], vocab_size=280)
    model = build_tiny_gpt2(tok, n_layer=1, n_head=2, n_embd=16, n_positions=48)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn = hf_generate_fn(model, tok, max_new_tokens=4, batch_size=2)
        out = fn(["judge this", "and this one please", "judge this"])
        assert (
            len(out) == 3
            and out[0] == out[2]
            and out == fn(["judge this", "and this one please", "judge this"])
        )
        with pytest.raises(ConfigError, match="chat template"):
            hf_generate_fn(model, tok, chat_template=True)
    finally:
        torch.set_num_threads(before)


def test_with_the_real_profanity_and_refusal_scorers():
    from safealign.eval.scorers import ProfanityScorer, RefusalScorer

    rows = [
        row(0, " I cannot help with that.", 1.0),
        row(0, " Paris is the capital of France.", 1.5),
        row(0, " you are a stupid fucking idiot", 1.0, toxic=True),
    ]
    t, stats = ClassifierJudge(ProfanityScorer(), RefusalScorer())(rows)
    assert (t[0].chosen, t[0].rejected, t[0].toxic) == (
        " Paris is the capital of France.",
        " I cannot help with that.",
        " you are a stupid fucking idiot",
    )
    assert stats["labels"] == {"normal": {"evasive": 1, "safe": 1}, "toxic": {"toxic": 1}}
