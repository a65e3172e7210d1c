"""ISAAC rephraser (docs/methods.md B.3, B.5): input string, multi-target seq2seq loss with -100
padding, tempering resampling, rewrite() with a detector, export round trip, determinism."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from safealign.data.collate import IGNORE
from safealign.fit import build
from safealign.isaac.rephrase import (
    Seq2SeqCollator,
    Seq2SeqEncoded,
    encode_text,
    rephrase_input,
    rewrite,
)
from safealign.losses import seq2seq_multi_target_loss
from safealign.run import train
from safealign.types import chat_prompt

SMALL = [
    "data.source.size=200",
    "data.k=30",
    "data.encoder.dim=16",
    "model.tokenizer.vocab_size=300",
    "method.summary_rows=6",
    "method.generation.max_length=24",
    "logger=csv",
    "trainer.enable_progress_bar=false",
]


def reph_cfg(make_cfg, *extra: str):
    return make_cfg("experiment=isaac_rephraser_builtin", *SMALL, *extra, tiny=False)


class FlagEveryOther:
    """Fake detector: flags rows 0, 2, 4, ...; row 3 cannot be scored (nan)."""

    name = "fake"

    def score(self, responses, contexts=None):
        s = np.array([1.0 if i % 2 == 0 else 0.1 for i in range(len(responses))])
        if len(s) > 3:
            s[3] = math.nan
        return s


def test_input_string_same_as_authors_training_input():
    assert (
        rephrase_input(chat_prompt(["how are you?"]), " fine, you?")
        == "User: how are you? System: fine, you?"
    )
    multi = chat_prompt(["hi", "hello", "tell me more"])
    assert rephrase_input(multi, " ok") == "User: hi System: hello User: tell me more System: ok"


def test_loss_averages_over_targets_and_ignores_padding():
    # V = 2. Logits [0, 0] give NLL ln 2; [0, ln 3] with label 1 gives ln(4/3). Pad positions
    # carry extreme logits that would dominate if they were not masked with -100.
    lo, hi, pad_logit = [0.0, 0.0], [0.0, math.log(3.0)], [20.0, -20.0]
    logits = torch.tensor([
        [lo, hi, pad_logit],         # context 0, target 0: labels 0, 1, pad -> (ln2 + ln4/3) / 2
        [hi, pad_logit, pad_logit],  # context 0, target 1: label 1, pad, pad -> ln(4/3)
        [lo, lo, lo],                # context 1, target 0: labels 0, 0, 0 -> ln 2
        [lo, lo, lo],                # context 1, target 1: all padding -> left out of the mean
    ])  # fmt: skip
    labels = torch.tensor([[0, 1, IGNORE], [1, IGNORE, IGNORE], [0, 0, 0], [IGNORE] * 3])
    got = seq2seq_multi_target_loss(logits, labels, n_targets=2)
    l2, l43 = math.log(2), math.log(4 / 3)
    expected = torch.tensor([((l2 + l43) / 2 + l43) / 2, l2])
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="cannot be grouped"):
        seq2seq_multi_target_loss(logits, labels, n_targets=3)


def test_collator_pads_sources_once_and_targets_with_ignore():
    items = [
        (0, Seq2SeqEncoded([5, 6, 1], [[7, 1], [8, 9, 1]], False)),
        (1, Seq2SeqEncoded([5, 1], [[7, 1], [1]], False)),
    ]
    b = Seq2SeqCollator(pad_id=0)(items)
    assert b["input_ids"].tolist() == [[5, 6, 1], [5, 1, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[7, 1, IGNORE], [8, 9, 1], [7, 1, IGNORE], [1, IGNORE, IGNORE]]
    assert int(b["n_targets"]) == 2


def test_module_loss_equals_hf_loss_per_target(make_cfg):
    """Encoding each source once and repeating it M times = HF's own loss on each target."""
    dm, tok, module, _ = build(reph_cfg(make_cfg, "data.sampler.m=3"))
    module.configure_model()
    module.model.eval()
    batch = next(iter(dm.train_dataloader()))
    got = module.per_example_loss(batch)
    m = int(batch["n_targets"])
    for i in range(2):
        per_target = [
            module.model(input_ids=batch["input_ids"][i : i + 1],
                         attention_mask=batch["attention_mask"][i : i + 1],
                         labels=batch["labels"][i * m + j : i * m + j + 1]).loss
            for j in range(m)
        ]  # fmt: skip
        torch.testing.assert_close(got[i], torch.stack(per_target).mean(), rtol=1e-5, atol=1e-5)


def test_sources_and_targets_are_encoded_for_seq2seq(make_cfg):
    dm, tok, _, _ = build(reph_cfg(make_cfg, "data.max_target_length=8"))
    e, r = dm.encoded["train"][0], dm.corpus.train[0]
    assert e.input_ids[-1] == tok.eos_token_id
    assert tok.decode(e.input_ids[:-1]) == rephrase_input(r.context, r.original)
    assert all(t[-1] == tok.eos_token_id and len(t) <= 8 for t in e.targets)
    ids, cut = encode_text(tok, "a b c d e f g h i j k", 4)
    assert cut and len(ids) == 4 and ids[-1] == tok.eos_token_id


def test_tempering_stage_reencodes_new_targets(make_cfg):
    dm, _, _, _ = build(
        reph_cfg(make_cfg, "data.sampler.mode=random", "data.sampler.keep_original=false")
    )
    stage0 = [e.targets for e in dm.encoded["train"]]
    dm.trainer = SimpleNamespace(current_epoch=1)  # what Lightning sets before the reload
    dm.train_dataloader()
    assert dm.stage == 1 and isinstance(dm.encoded["train"][0], Seq2SeqEncoded)
    assert [e.targets for e in dm.encoded["train"]] != stage0


def test_rewrite_only_touches_flagged_responses(make_cfg):
    dm, tok, module, _ = build(reph_cfg(make_cfg))
    module.configure_model()
    rows = dm.held_out(6)
    contexts, responses = [r[0] for r in rows], [r[1] for r in rows]
    seen = []
    original_generate = module.model.generate

    def counting_generate(**kw):
        seen.append(kw["input_ids"].shape[0])
        return original_generate(**kw)

    module.model.generate = counting_generate
    res = rewrite(module.model, tok, contexts, responses, detector=FlagEveryOther(), max_length=12)
    flagged = np.array([True, False, True, False, True, False])
    assert sum(seen) == flagged.sum()  # the rephraser never ran on unflagged rows
    assert res.n_unscored == 1 and not res.rewritten[3]
    for i in np.flatnonzero(~flagged):
        assert res.responses[i] == responses[i]  # byte-identical
    assert res.rewritten[flagged].sum() + res.n_empty == flagged.sum()
    assert all(res.responses[i].startswith(" ") for i in np.flatnonzero(res.rewritten))
    all_rows = rewrite(module.model, tok, contexts, responses, max_length=12)
    assert all_rows.scores is None and all_rows.rewritten.sum() + all_rows.n_empty == 6
    with pytest.raises(ValueError, match="contexts"):
        rewrite(module.model, tok, contexts[:2], responses, max_length=12)


def _run(make_cfg, *extra) -> tuple[dict, list[dict], str]:
    cfg = reph_cfg(make_cfg, "trainer=debug", *extra)
    train(cfg)
    out = Path(cfg.paths.output_dir)
    rewrites = [json.loads(line) for line in (out / "rewrites.jsonl").read_text().splitlines()]
    return json.loads((out / "metrics.json").read_text()), rewrites, str(out / "model")


def test_fast_dev_run_export_round_trip_and_same_seed_same_outputs(make_cfg):
    from safealign.models import load_tokenizer
    from safealign.models.seq2seq import load_seq2seq

    metrics, rewrites, model_dir = _run(make_cfg)
    assert {"train/loss", "val/loss", "rewrite/changed_rate", "rewrite/profanity/after"} <= set(
        metrics
    )
    assert len(rewrites) == 6 and {"context", "response", "rewrite", "label"} <= set(rewrites[0])
    # The exported rephraser, reloaded from disk, rewrites exactly as during the run.
    tok = load_tokenizer(model_dir)
    model = load_seq2seq(tok, model_dir)
    res = rewrite(
        model,
        tok,
        [r["context"] for r in rewrites],
        [r["response"] for r in rewrites],
        max_length=24,
    )
    assert res.responses == [r["rewrite"] for r in rewrites]
    # Same seed: same loss and same rewrites; another seed: another model.
    metrics_b, rewrites_b, _ = _run(make_cfg)
    assert metrics_b["train/loss"] == metrics["train/loss"]
    assert [r["rewrite"] for r in rewrites_b] == [r["rewrite"] for r in rewrites]
    metrics_c, _, _ = _run(make_cfg, "seed=1")
    assert metrics_c["train/loss"] != metrics["train/loss"]
