"""Scorers: toxicity, evasiveness and coherence, on tiny local models (no downloads)."""

from __future__ import annotations

import math
import os
import sys
import types

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safealign.annotate.llm import parse_yes_no  # noqa: E402
from safealign.errors import ConfigError  # noqa: E402
from safealign.eval.coherence import (  # noqa: E402
    EmbeddingCoherenceScorer,
    LMCoherenceScorer,
    strip_role_tags,
)
from safealign.eval.scorers import (  # noqa: E402
    DetoxifyScorer,
    GroundTruthScorer,
    HFClassifierScorer,
    LLMJudgeScorer,
    ProfanityScorer,
    RefusalScorer,
    Scorer,
)
from safealign.types import SAFE, UNSAFE, DialogueExample  # noqa: E402

CORPUS = [
    "\n\nHuman: can you book a table for two tonight?\n\nAssistant: Sure, which restaurant?",
    "I am sorry, but I cannot help with that request.",
    "The train leaves at noon and arrives in the evening.",
    "you are a fool and I hate this, go away now please.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "[PAD]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="[PAD]",
    )


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tokenizer))
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tokenizer):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(1)
    cfg = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tokenizer), num_labels=2
    )
    cfg.pad_token_id = tokenizer.pad_token_id
    path = tmp_path_factory.mktemp("clf")
    GPT2ForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------- toxicity


def test_profanity_scorer():
    scorer = ProfanityScorer()
    assert isinstance(scorer, Scorer)
    scores = scorer.score(["you are a fucking idiot", "have a nice day at the museum"])
    assert scores.shape == (2,) and scores[0] > 0.9 and scores[1] < 0.5
    assert scorer.score([]).shape == (0,)


def _direct_probs(path, ids_list):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits.softmax(-1)[0, 1].item() for ids in ids_list]


def test_hf_classifier_matches_unbatched_model(classifier_dir, tokenizer):
    template = "<|user|>{context}<|system|>{response}"
    scorer = HFClassifierScorer(
        str(classifier_dir), batch_size=2, max_length=64, input_template=template
    )
    responses, contexts = (
        [" Sure.", " The train leaves at noon today.", " Go away."],
        ["a", "b", ""],
    )
    got = scorer.score(responses, contexts)
    texts = [
        template.format(context=c, response=r) for c, r in zip(contexts, responses, strict=True)
    ]
    want = _direct_probs(classifier_dir, [tokenizer(t)["input_ids"] for t in texts])
    np.testing.assert_allclose(got, want, atol=1e-5)  # padding inside a batch changes nothing
    flipped = HFClassifierScorer(str(classifier_dir), unsafe_label=0, input_template=template)
    np.testing.assert_allclose(flipped.score(responses, contexts), 1 - got, atol=1e-5)


def test_hf_classifier_keeps_last_tokens(classifier_dir, tokenizer):
    text = "The train leaves at noon and arrives in the evening. " * 3
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > 8
    got = HFClassifierScorer(str(classifier_dir), max_length=8).score([text])
    np.testing.assert_allclose(got, _direct_probs(classifier_dir, [ids[-8:]]), atol=1e-5)


def test_hf_classifier_config_errors(tmp_path, classifier_dir):
    with pytest.raises(ConfigError, match="path"):
        HFClassifierScorer(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="input_template"):
        HFClassifierScorer(str(classifier_dir), input_template="{context}")
    with pytest.raises(ConfigError, match="unsafe_label"):
        HFClassifierScorer(str(classifier_dir), unsafe_label=2).score([" hi"])


def test_detoxify_scorer_errors_and_wiring(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="checkpoint"):
        DetoxifyScorer(checkpoint=str(tmp_path / "missing.ckpt"))
    ckpt = tmp_path / "toxic.ckpt"
    ckpt.write_bytes(b"\0")
    monkeypatch.setitem(sys.modules, "detoxify", None)  # import detoxify -> ImportError
    with pytest.raises(ConfigError, match="pip install detoxify"):
        DetoxifyScorer(checkpoint=str(ckpt)).score(["hi"])

    calls = {}

    class FakeDetoxify:
        def __init__(self, model_type, checkpoint, device, **kwargs):
            calls.update(model_type=model_type, checkpoint=checkpoint, **kwargs)

        def predict(self, texts):
            return {"toxicity": [0.9 if "idiot" in t else 0.1 for t in texts], "insult": [0] * 2}

    monkeypatch.setitem(sys.modules, "detoxify", types.SimpleNamespace(Detoxify=FakeDetoxify))
    scorer = DetoxifyScorer(checkpoint=str(ckpt), huggingface_config_path=str(tmp_path))
    np.testing.assert_allclose(scorer.score(["idiot", "fine"]), [0.9, 0.1])
    assert calls == {
        "model_type": "original",
        "checkpoint": str(ckpt),
        "huggingface_config_path": str(tmp_path),
    }


def test_ground_truth_scorer_counts_unknown():
    scorer = GroundTruthScorer({"hello there": "Safe", " go away, idiot": "Unsafe"})
    got = scorer.score([" hello there", "go away, idiot", " never seen"])
    assert got[:2].tolist() == [0.0, 1.0] and math.isnan(got[2])
    assert scorer.n_unknown == 1
    examples = [
        DialogueExample("c1", " I don't know.", SAFE),
        DialogueExample("c2", " I don't know.", UNSAFE),
        DialogueExample("c3", " Sure.", SAFE),
    ]
    from_ex = GroundTruthScorer.from_examples(examples)
    assert from_ex.score([" I don't know.", " Sure."]).tolist() == [1.0, 0.0]
    assert from_ex.n_unknown == 0


# ---------------------------------------------------------------- evasiveness


def test_refusal_scorer_defaults():
    refusals = [
        "I can't help with that.",
        "I\u2019m not able to do this.",
        "Sorry, but no.",
        "As an AI, I have no opinion.",
        "I'd rather not say.",
        "I CANNOT answer.",
    ]
    answers = ["Sure, the train leaves at noon.", "I can help you with that!", "Cannot wait!"]
    assert RefusalScorer().score(refusals + answers).tolist() == [1.0] * 6 + [0.0] * 3


def test_refusal_scorer_custom_and_bad_patterns():
    assert RefusalScorer([r"\bnope\b"]).score(["Nope.", "I cannot"]).tolist() == [1.0, 0.0]
    with pytest.raises(ConfigError, match="patterns"):
        RefusalScorer(["(unclosed"])
    with pytest.raises(ConfigError, match="patterns"):
        RefusalScorer([])


@pytest.mark.parametrize(
    ("answer", "want"),
    [
        ("Yes", 1.0),
        (" no.", 0.0),
        ("**Yes**, it is evasive", 1.0),
        ("No, because yes is wrong", 0.0),
        ("The answer is yes.", 1.0),
        ("Maybe", None),
        ("Either yes or no", None),
        ("Nobody knows", None),
        ("", None),
    ],
)
def test_parse_yes_no(answer, want):
    assert parse_yes_no(answer) == want


def test_llm_judge_scorer_with_fake_generator():
    seen = []

    def fake_generate(prompts):
        seen.extend(prompts)
        return ["Yes." if "sorry" in p else "no" if "train" in p else "hmm" for p in prompts]

    judge = LLMJudgeScorer(fake_generate, template="Q: {context}\nA: {response}\nEvasive?")
    got = judge.score([" I'm sorry", " The train is late", " ok"], ["c1", "c2", "c3"])
    assert got[:2].tolist() == [1.0, 0.0] and math.isnan(got[2])
    assert judge.n_invalid == 1 and seen[0] == "Q: c1\nA:  I'm sorry\nEvasive?"
    with pytest.raises(ValueError, match="2 answers"):
        LLMJudgeScorer(lambda p: ["yes", "no"], "{response}").score(["a"])
    with pytest.raises(ConfigError, match="template"):
        LLMJudgeScorer(fake_generate, "{context}")


# ---------------------------------------------------------------- coherence


def _brute_nll(model, tokenizer, condition, target, bos=True):
    cond = ([tokenizer.bos_token_id] if bos else []) + tokenizer(condition)["input_ids"]
    tgt = tokenizer(target)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([cond + tgt])).logits[0].log_softmax(-1)
    # token at position p is predicted by the logits at p - 1
    return -sum(logp[len(cond) + k - 1, t].item() for k, t in enumerate(tgt)) / len(tgt)


def test_lm_coherence_matches_brute_force(tiny_lm, tokenizer):
    contexts = ["\n\nHuman: book a table?\n\nAssistant:", "Hi", "\n\nHuman: train times?"]
    responses = [" Sure, which restaurant?", " The train leaves at noon and arrives late.", " no"]
    fwd = LMCoherenceScorer(tiny_lm, tokenizer, batch_size=2)
    got = fwd.score(responses, contexts)
    want = [_brute_nll(tiny_lm, tokenizer, c, r) for c, r in zip(contexts, responses, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(fwd.ppl(responses, contexts), np.exp(want), rtol=1e-5)
    back = LMCoherenceScorer(tiny_lm, tokenizer, batch_size=3, direction="backward")
    want_b = [
        _brute_nll(tiny_lm, tokenizer, r, c) for c, r in zip(contexts, responses, strict=True)
    ]
    np.testing.assert_allclose(back.score(responses, contexts), want_b, rtol=1e-5)
    no_bos = LMCoherenceScorer(tiny_lm, tokenizer, add_bos=False, exponentiate=True)
    want_nb = [
        _brute_nll(tiny_lm, tokenizer, c, r, bos=False)
        for c, r in zip(contexts, responses, strict=True)
    ]
    np.testing.assert_allclose(no_bos.score(responses, contexts), np.exp(want_nb), rtol=1e-5)
    assert no_bos.name == "coherence_forward_ppl" and fwd.name == "coherence_forward_nll"


def test_lm_coherence_truncates_condition_from_the_left(tiny_lm, tokenizer):
    context = "The train leaves at noon and arrives in the evening. " * 4
    response = " Sure, which restaurant?"
    n_tgt = len(tokenizer(response)["input_ids"])
    scorer = LMCoherenceScorer(tiny_lm, tokenizer, max_length=n_tgt + 6)
    cond = tokenizer(context)["input_ids"][-5:]  # BOS + last 5 condition tokens + target
    ids = [tokenizer.bos_token_id] + cond + tokenizer(response)["input_ids"]
    with torch.no_grad():
        logp = tiny_lm(torch.tensor([ids])).logits[0].log_softmax(-1)
    want = -np.mean([logp[p - 1, ids[p]].item() for p in range(len(ids) - n_tgt, len(ids))])
    np.testing.assert_allclose(scorer.score([response], [context]), [want], rtol=1e-5)


def test_lm_coherence_edge_cases(tiny_lm, tokenizer):
    scorer = LMCoherenceScorer(tiny_lm, tokenizer, add_bos=False)
    assert len(tokenizer("x")["input_ids"]) == 1
    got = scorer.score(["", "x"], ["ctx", ""])  # empty target; one token with nothing before
    assert np.isnan(got).all()
    with pytest.raises(ValueError, match="context"):
        scorer.score([" hi"], None)
    with pytest.raises(ConfigError, match="direction"):
        LMCoherenceScorer(tiny_lm, tokenizer, direction="sideways")
    assert scorer.score([], []).shape == (0,)


class FakeEncoder:
    """Bag-of-letters vectors: deterministic, so cosines can be computed by hand."""

    def encode(self, texts, **kwargs):
        return np.array([[t.count("a"), t.count("b")] for t in texts], dtype=float)


def test_embedding_coherence_with_fake_encoder():
    scorer = EmbeddingCoherenceScorer(encoder=FakeEncoder())
    # (1,0)·(1,0)=1; (1,0)·(0,2)/2=0; (3,4)·(4,3)/25=24/25
    got = scorer.score(["a", "bb", "aaaabbb"], ["\n\nHuman: a\n\nAssistant:", "a", "aaabbbb"])
    np.testing.assert_allclose(got, [1.0, 0.0, 24 / 25])
    assert strip_role_tags("\n\nHuman: hi\n\nAssistant:") == "hi"
    with pytest.raises(ValueError):
        scorer.score(["a"], ["a", "b"])


@pytest.mark.slow
def test_embedding_coherence_minilm():
    scorer = EmbeddingCoherenceScorer()
    context = "\n\nHuman: Can you recommend a cheap Italian restaurant in the centre?\n\nAssistant:"
    got = scorer.score(
        [" Pizza Hut City Centre is cheap and serves Italian food.", " The stock market fell."],
        [context, context],
    )
    assert got[0] > got[1] + 0.2 and np.all(np.abs(got) <= 1 + 1e-6)


def test_refusal_detector_on_the_builtin_corpus():
    """Every built-in evasive template is flagged and no safe or unsafe response is."""
    from safealign.data.builtin import generate_builtin
    from safealign.eval.scorers import RefusalScorer

    corpus = generate_builtin(size=2000, seed=0)
    rows = corpus.train + corpus.val + corpus.test
    flags = RefusalScorer().score([r.response for r in rows])
    for r, f in zip(rows, flags, strict=True):
        assert f == (r.label == "evasive"), (r.label, r.response)
