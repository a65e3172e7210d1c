"""Safety classifier (docs/methods.md B.7): input string, last-token truncation, labels, training,
export and scoring through HFClassifierScorer / SafetyClassifierScorer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from safealign.data.classify import (
    INPUT_TEMPLATE,
    ClassificationDataModule,
    classifier_context,
    classifier_text,
    encode_text,
    label_id,
)
from safealign.errors import ConfigError
from safealign.fit import build
from safealign.models.encoder import load_encoder_tokenizer, load_sequence_classifier, minilm_path
from safealign.run import train
from safealign.types import Corpus, DialogueExample, chat_prompt

SAFE_REPLIES = [
    "That sounds lovely, enjoy it.",
    "Sure, happy to help with that.",
    "Good luck with the exam tomorrow.",
    "Drink some water and rest a bit.",
]
UNSAFE_REPLIES = [
    "Shut up, you stupid idiot.",
    "Nobody cares, you worthless loser.",
    "Go hurt yourself, idiot.",
    "You are a pathetic moron.",
]
PROMPTS = [
    "I am going to the beach.",
    "Can you help me study?",
    "I have a test soon.",
    "I feel tired today.",
]


def _rows(n: int, offset: int = 0) -> list[dict]:
    """Half unsafe; the prompt carries no label signal, only the reply does."""
    rows = []
    for i in range(n):
        unsafe = i % 2 == 1
        replies = UNSAFE_REPLIES if unsafe else SAFE_REPLIES
        rows.append(
            {
                "context": PROMPTS[(i // 2) % 4],
                "response": replies[(i // 8 + offset) % 4],
                "category": "Offending User",
                "label": "Unsafe" if unsafe else "Safe",
            }
        )
    return rows


def write_diasafety(root: Path, n_train: int = 64, n_eval: int = 16) -> Path:
    """DiaSafety's real format: one JSON array per split of {context, response, category, label}."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        (root / f"{split}.json").write_text(json.dumps(_rows(n, offset=len(split))))
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return load_encoder_tokenizer()


def cls_cfg(make_cfg, data_dir: Path, *extra: str):
    return make_cfg(
        "method=classifier",
        "model=tiny_encoder",
        "data=diasafety_cls",
        f"data.source.path={data_dir}",
        "data.batch_size=8",
        *extra,
        tiny=False,
    )


def test_input_string_is_b7_with_raw_context():
    ctx = chat_prompt(["Is it safe to swim here?"])  # "\n\nHuman: ...\n\nAssistant:"
    assert (
        classifier_text(ctx, " Yes, go ahead.")
        == "<|user|>Is it safe to swim here?<|system|>Yes, go ahead."
    )
    multi = chat_prompt(["hi", "hello!", "tell me a joke"])
    assert (
        classifier_text(multi, " no")
        == "<|user|>hi<|system|>hello!<|user|>tell me a joke<|system|>no"
    )
    assert classifier_text("plain text", "r") == "<|user|>plain text<|system|>r"
    # The scorer's template over the converted context gives the same string.
    assert INPUT_TEMPLATE.format(
        context=classifier_context(multi), response="no"
    ) == classifier_text(multi, "no")


def test_truncation_keeps_the_last_tokens(tokenizer):
    text = classifier_text(chat_prompt([" ".join(f"word{i}" for i in range(200))]), " the very end")
    full = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    e = encode_text(tokenizer, text, max_length=16, add_special_tokens=False)
    assert e.truncated and e.input_ids == full[-16:]
    e = encode_text(tokenizer, text, max_length=16, add_special_tokens=True)
    assert e.input_ids[0] == tokenizer.cls_token_id and e.input_ids[-1] == tokenizer.sep_token_id
    assert e.input_ids[1:-1] == full[-14:]
    assert tokenizer.decode(e.input_ids[-4:-1]) == "the very end"
    short = encode_text(tokenizer, "<|user|>hi<|system|>ok", 16, True)
    assert not short.truncated


def test_label_mapping_and_unlabelled_rows_dropped(tokenizer):
    assert (label_id("unsafe"), label_id("safe"), label_id("evasive"), label_id("unknown")) == (
        1,
        0,
        0,
        None,
    )
    rows = [
        DialogueExample(chat_prompt(["q"]), " a", lab)
        for lab in ("safe", "unsafe", "evasive", "unknown")
    ]
    dm = ClassificationDataModule(Corpus(train=rows, val=rows, name="t"), max_length=32)
    dm.attach(tokenizer, DialogueExample)
    assert [e.label for e in dm.encoded["train"]] == [0, 1, 0]
    assert dm.stats["dropped_unlabelled"] == 2  # one per split with rows (train, val)
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].tolist() == [0, 1, 0] and batch["input_ids"].shape[0] == 3
    with pytest.raises(ConfigError, match="max_length"):
        ClassificationDataModule(Corpus(train=rows), max_length=1)


def test_length_grouped_batches_cover_every_row_once_and_are_seeded():
    from safealign.data.classify import LengthGroupedBatches

    lengths = [(i * 37) % 101 for i in range(203)]
    a = LengthGroupedBatches(lengths, batch_size=8, shuffle=True, seed=0, window=4)
    first, second = list(a), list(a)
    assert len(first) == len(a)
    assert sorted(i for b in first for i in b) == list(range(203))
    assert first != second  # each pass reshuffles (seed + pass)
    again = LengthGroupedBatches(lengths, batch_size=8, shuffle=True, seed=0, window=4)
    assert list(again) == first
    # Within a batch lengths are close: rows were sorted inside windows of 4 batches.
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first])
    assert spread < 30  # random batches of 8 from 0..100 spread ~78
    ev = list(LengthGroupedBatches(lengths, batch_size=8, shuffle=False, seed=0))
    assert sorted(i for b in ev for i in b) == list(range(203)) and len(ev) == 26


def test_fast_dev_run_exports_a_classifier_the_scorers_load(make_cfg, tmp_path):
    from safealign.eval.scorers import HFClassifierScorer
    from safealign.methods.classifier import SafetyClassifierScorer

    cfg = cls_cfg(make_cfg, write_diasafety(tmp_path / "dia"), "trainer=debug")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("train/loss", "val/acc", "val/f1", "test/acc", "test/f1"):
        assert key in metrics, key
    assert metrics["test/n"] == 16
    settings = json.loads((out / "model" / "classifier_input.json").read_text())
    assert settings["input_template"] == "<|user|>{context}<|system|>{response}"

    # The exported weights, scored three ways, agree: module forward on the datamodule's own
    # encoding, the plain HF scorer on raw contexts, the safety scorer on project contexts.
    dm, _, module, _ = build(cfg)
    module.configure_model()
    from safetensors.torch import load_file

    module.model.load_state_dict(load_file(out / "model" / "model.safetensors"))
    module.model.eval()
    dm_rows = dm.corpus.test
    with torch.no_grad():
        batch = next(iter(dm.test_dataloader()))
        probs = module.logits(batch).softmax(-1)[:, 1]
    expected = np.empty(len(dm_rows))
    expected[batch["index"].numpy()] = probs.numpy()  # eval batches are grouped by length
    raw_ctx = [classifier_context(r.context) for r in dm_rows]
    plain = HFClassifierScorer(
        str(out / "model"),
        unsafe_label=1,
        max_length=128,
        input_template=INPUT_TEMPLATE,
        add_special_tokens=True,
    )
    got_plain = plain.score([r.response.strip() for r in dm_rows], raw_ctx)
    got_safety = SafetyClassifierScorer(str(out / "model")).score(
        [r.response for r in dm_rows], [r.context for r in dm_rows]
    )
    np.testing.assert_allclose(got_plain, expected, atol=1e-5)
    np.testing.assert_allclose(got_safety, got_plain, atol=1e-6)


def test_tiny_classifier_learns_a_separable_task(make_cfg, tmp_path):
    cfg = cls_cfg(
        make_cfg,
        write_diasafety(tmp_path / "dia", n_train=96, n_eval=32),
        "trainer.max_epochs=6",
        "method.optimizer.lr=3.0e-3",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "trainer.callbacks=[]",
    )
    metrics = _train_metrics(cfg)
    assert metrics["test/acc"] >= 0.9, metrics


def _train_metrics(cfg) -> dict:
    train(cfg)
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def test_same_seed_same_logits(make_cfg, tmp_path):
    data = write_diasafety(tmp_path / "dia")

    def first_logits(seed: int) -> torch.Tensor:
        dm, _, module, _ = build(cls_cfg(make_cfg, data, f"seed={seed}"))
        module.configure_model()
        with torch.no_grad():
            return module.logits(next(iter(dm.train_dataloader())))

    a, b, c = first_logits(0), first_logits(0), first_logits(1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_minilm_head_is_seeded_and_leaves_global_rng(tokenizer):
    assert (minilm_path() / "model.safetensors").is_file()
    state = torch.random.get_rng_state()
    m0 = load_sequence_classifier(tokenizer, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    m0b = load_sequence_classifier(tokenizer, seed=0)
    assert torch.equal(m0.classifier.weight, m0b.classifier.weight)
    assert m0.config.id2label == {0: "safe", 1: "unsafe"}
    with pytest.raises(ConfigError, match="name_or_path"):
        load_sequence_classifier(tokenizer, name_or_path="/nonexistent")


@pytest.mark.slow
def test_real_diasafety_labels_and_lengths(shared_data, tokenizer):
    from safealign.data.sources import load_diasafety

    dm = ClassificationDataModule(load_diasafety(shared_data / "diasafety"), max_length=128)
    dm.attach(tokenizer, DialogueExample)
    raw = json.loads((shared_data / "diasafety" / "test.json").read_text())
    n_unsafe = sum(r["label"] == "Unsafe" and r["response"].strip() != "" for r in raw)
    assert sum(e.label for e in dm.encoded["test"]) == n_unsafe
    assert max(len(e.input_ids) for e in dm.encoded["train"]) <= 128


def test_experiment_composes_with_the_minilm_encoder(make_cfg):
    from hydra.utils import instantiate

    cfg = make_cfg("experiment=classifier_diasafety", tiny=False)
    assert cfg.model.lm._target_ == "safealign.models.encoder.load_sequence_classifier"
    assert cfg.data.max_length == 128 and cfg.data.source.path.endswith("diasafety")
    assert callable(instantiate(cfg.method))
    tok = instantiate(cfg.model.tokenizer)(texts=[])
    assert tok.truncation_side == "left" and tok.pad_token_id is not None
