"""PreferenceModule: cached reference log-probs, on-the-fly parity, NaN guard, data policies."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from safealign.data.datamodule import DataModule
from safealign.errors import ConfigError, NonFiniteLossError
from safealign.losses import adpo_loss, dpo_loss
from safealign.methods.preference import PreferenceModule
from safealign.methods.toxic_ref import FrozenSFT, PolicyDetached
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
    batch = dm.collator()(dm.indexed_rows("train")[:4])
    a, b = pre.reference_logps(batch, "train"), fly.reference_logps(batch, "train")
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-5)


def test_policy_detached_pi_t_follows_the_policy(tokenizer, tmp_path):
    dm, module, trainer = setup(tokenizer, tmp_path, toxic_ref=PolicyDetached())
    trainer.fit(module, datamodule=dm)
    batch = dm.collator()(dm.indexed_rows("train")[:4])
    frozen = module.ref_cache["train"]["toxic"][batch.index]
    now = module.reference_logps(batch, "train").toxic
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


def test_toxic_ref_that_is_not_a_target_node_names_the_key(tokenizer, tmp_path):
    """The pre-issue-13 string form (`method.toxic_ref=policy_detached`) fails clearly."""
    with pytest.raises(ConfigError, match=r"method\.toxic_ref.*PolicyDetached"):
        setup(tokenizer, tmp_path, toxic_ref="policy_detached")


def test_toxic_ref_is_chosen_by_target_from_the_command_line():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        default = compose("train", overrides=["method=adpo"])
        detached = compose("train", overrides=[
            "method=adpo", "method.toxic_ref._target_=safealign.methods.toxic_ref.PolicyDetached"])
    assert isinstance(instantiate(default.method.toxic_ref), FrozenSFT)
    assert isinstance(instantiate(detached.method.toxic_ref), PolicyDetached)


def test_every_module_shares_the_base_steps_and_syncs_epoch_metrics():
    """One step plumbing (BaseModule): no module re-declares the Lightning step hooks, and
    val/test metrics are reduced over ranks (sync_dist) while train metrics are per step."""
    from safealign.methods.base import BaseModule
    from safealign.methods.classifier import ClassifierModule
    from safealign.methods.rephraser import RephraserModule
    from safealign.methods.sft import MultiTargetModule, SFTModule

    for cls in (ClassifierModule, RephraserModule, SFTModule, MultiTargetModule, PreferenceModule):
        for hook in ("training_step", "validation_step", "test_step"):
            assert getattr(cls, hook) is getattr(BaseModule, hook), (cls, hook)
    module, logged = BaseModule(lambda tok: torch.nn.Linear(1, 1), None, None), []
    module.log = lambda name, value, **kw: logged.append((name, kw))
    for split in ("train", "val"):
        module.log_split(split, {"loss": torch.tensor(1.0), "acc": torch.tensor(0.5)}, 4)
    kw = dict(logged)
    assert kw["train/loss"] == dict(prog_bar=True, batch_size=4, on_step=True, on_epoch=True,
                                    sync_dist=False)  # fmt: skip
    assert kw["val/acc"] == dict(prog_bar=False, batch_size=4, on_step=False, on_epoch=True,
                                 sync_dist=True)  # fmt: skip


@pytest.mark.parametrize("needs_toxic", [False, True])
def test_shared_prompt_module_matches_unshared(tokenizer, tmp_path, needs_toxic, monkeypatch):
    """method.shared_prompt (issue 12): the same training run, reference precompute included,
    to float rounding, and the two forwards never share a reference cache entry."""
    import safealign.shared_prompt as sp

    def no_fallback(*args, **kwargs):
        raise AssertionError("shared_prompt_forward fell back to the unshared forward")

    runs = {}
    for shared in (False, True):
        loss = None if needs_toxic else functools.partial(dpo_loss, beta=0.9)
        dm, module, trainer = setup(tokenizer, tmp_path, loss=loss, needs_toxic=needs_toxic,
                                    shared_prompt=shared)  # fmt: skip
        with monkeypatch.context() as m:
            if shared:
                m.setattr(sp, "concatenated_forward", no_fallback)
            trainer.fit(module, datamodule=dm)
        runs[shared] = module
    a, b = runs[False], runs[True]
    for split, fields in a.ref_cache.items():
        for name, t in fields.items():
            torch.testing.assert_close(b.ref_cache[split][name], t, rtol=0, atol=1e-4)
    losses = [[row["train/loss_step"] for row in m.history] for m in (a, b)]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], abs=1e-5)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=0, atol=1e-5)
    assert len(list((tmp_path / "ref").glob("reflogps-*.safetensors"))) == 2
