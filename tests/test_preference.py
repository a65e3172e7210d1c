"""PreferenceModule: cached reference log-probs, on-the-fly parity, NaN guard, data policies."""

from __future__ import annotations

import functools

import pytest
import torch

from safealign.data.datamodule import DataModule
from safealign.errors import NonFiniteLossError
from safealign.losses import adpo_loss, dpo_loss
from safealign.methods.preference import PreferenceModule
from safealign.models import build_tiny_gpt2, train_bpe_tokenizer
from safealign.types import Corpus, LossOut, PreferenceExample, chat_prompt


def rows(n: int = 12) -> list[PreferenceExample]:
    out = []
    for i in range(n):
        p = chat_prompt([f"how do I look after plant number {i}?"])
        out.append(PreferenceExample(p, " Water it weekly and keep it bright.", " Figure it out, idiot.",
                                     " Shut up, nobody cares about your stupid plant."))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    texts = [t for r in rows() for t in (r.prompt, r.chosen, r.rejected, r.toxic)]
    return train_bpe_tokenizer(texts, vocab_size=300)


def setup(tokenizer, tmp_path, loss=None, needs_toxic=True, **kw):
    import lightning.pytorch as L

    dm = DataModule(Corpus(train=rows(), val=rows(4), name="t"), batch_size=4)
    dm.attach(tokenizer, PreferenceExample, needs_toxic)
    factory = functools.partial(build_tiny_gpt2, n_layer=1, n_head=2, n_embd=16, n_positions=128, seed=0)
    opt = functools.partial(torch.optim.AdamW, lr=1e-3)
    loss = loss or functools.partial(adpo_loss, beta=0.3, gamma=0.2)
    module = PreferenceModule(factory, tokenizer, opt, loss, needs_toxic=needs_toxic,
                              cache_dir=str(tmp_path / "ref"), **kw)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    return dm, module, trainer


def test_cache_is_written_then_reused(tokenizer, tmp_path, caplog):
    dm, module, trainer = setup(tokenizer, tmp_path)
    trainer.fit(module, datamodule=dm)
    files = list((tmp_path / "ref").glob("reflogps-*.safetensors"))
    assert len(files) == 1
    first = {s: {k: v.clone() for k, v in f.items()} for s, f in module.ref_cache.items()}
    caplog.set_level("INFO")
    dm2, module2, trainer2 = setup(tokenizer, tmp_path)
    trainer2.fit(module2, datamodule=dm2)
    assert "reference log-probs: reused" in caplog.text
    for s in first:
        for k in first[s]:
            torch.testing.assert_close(module2.ref_cache[s][k], first[s][k])


def test_corrupt_cache_is_recomputed_not_used(tokenizer, tmp_path, caplog):
    dm, module, trainer = setup(tokenizer, tmp_path)
    trainer.fit(module, datamodule=dm)
    (path,) = (tmp_path / "ref").glob("reflogps-*.safetensors")
    path.write_bytes(path.read_bytes()[:100])  # truncated: a half-written file
    caplog.set_level("INFO")
    dm2, module2, trainer2 = setup(tokenizer, tmp_path)
    trainer2.fit(module2, datamodule=dm2)
    assert "reference log-probs: computed" in caplog.text


def test_different_data_gets_a_different_key(tokenizer, tmp_path):
    dm, module, trainer = setup(tokenizer, tmp_path)
    trainer.fit(module, datamodule=dm)
    dm2, module2, trainer2 = setup(tokenizer, tmp_path)
    dm2.max_length = 40  # truncation changes the encoded rows, hence the numbers
    dm2.attach(tokenizer, PreferenceExample, True)
    trainer2.fit(module2, datamodule=dm2)
    assert len(list((tmp_path / "ref").glob("reflogps-*.safetensors"))) == 2


def test_precomputed_equals_on_the_fly_reference(tokenizer, tmp_path):
    dm, pre, _ = setup(tokenizer, tmp_path)
    _, fly, _ = setup(tokenizer, tmp_path / "b", precompute_reference=False)
    import lightning.pytorch as L

    for m in (pre, fly):
        t = L.Trainer(accelerator="cpu", logger=False, max_steps=0, enable_progress_bar=False)
        t.fit(m, datamodule=dm)
    batch = next(iter(dm._loader("train", False)))
    a, b = pre.reference_logps(batch, "train", 3), fly.reference_logps(batch, "train", 3)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-5)


def test_policy_detached_pi_t_follows_the_policy(tokenizer, tmp_path):
    dm, module, trainer = setup(tokenizer, tmp_path, toxic_ref="policy_detached")
    trainer.fit(module, datamodule=dm)
    batch = next(iter(dm._loader("train", False)))
    frozen = module.ref_cache["train"]["toxic"][batch["index"]]
    now = module.reference_logps(batch, "train", 3).toxic
    assert not torch.allclose(frozen, now)  # two optimizer steps moved the policy


def test_nan_loss_names_step_and_batch(tokenizer, tmp_path):
    def nan_loss(policy, reference):
        out = dpo_loss(policy, reference, beta=0.1)
        return LossOut(out.losses * float("nan"), out.chosen_rewards, out.rejected_rewards)

    dm, module, trainer = setup(tokenizer, tmp_path, loss=nan_loss, needs_toxic=False)
    with pytest.raises(NonFiniteLossError, match=r"global step 0 .*batch 0.*example indices"):
        trainer.fit(module, datamodule=dm)


def test_bad_preference_rows_are_dropped_with_counts(tokenizer):
    p = chat_prompt(["hi"])
    data = [
        PreferenceExample(p, " same", " same", " bad"),
        PreferenceExample(p, " ", " no", " bad"),
        PreferenceExample(p, " good", " bad", None),
        PreferenceExample(p, " good", " bad", " awful"),
    ]
    dm = DataModule(Corpus(train=data, name="t"))
    dm.attach(tokenizer, PreferenceExample, needs_toxic=True)
    assert len(dm.encoded["train"]) == 1
    assert dm.stats["dropped_identical_pair"] == 1
    assert dm.stats["dropped_empty_response"] == 1
    assert dm.stats["dropped_missing_toxic"] == 1


def test_step0_refuses_a_reference_that_does_not_reproduce_the_policy(tokenizer, tmp_path, monkeypatch):
    """A cache that passes every file check but belongs to other weights (here: shifted by 5
    nats) would bias every reward: the first step stops with a message naming the cache."""
    from safealign.methods import reference as ref

    dm, module, trainer = setup(tokenizer, tmp_path)
    trainer.fit(module, datamodule=dm)  # writes the true cache
    real = ref.load_cache

    def stale(*a, **k):
        cache = real(*a, **k)
        return {s: {f: v - 5.0 for f, v in fields.items()} for s, fields in cache.items()}

    monkeypatch.setattr(ref, "load_cache", stale)
    dm2, module2, trainer2 = setup(tokenizer, tmp_path)
    with pytest.raises(RuntimeError, match=r"step 0.*differ from the policy's by 5"):
        trainer2.fit(module2, datamodule=dm2)
