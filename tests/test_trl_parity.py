"""Parity with the field's reference: TRL 1.16 `DPOTrainer` (ENV.md "TRL 1.16 as a reference").

Same tiny GPT-2, same token ids: safealign's `concatenated_forward` + loss must give TRL's loss,
rewards, log-probs and the gradient of every parameter to 1e-5. TRL tokenises prompt+completion
as ONE string (EOS appended to the completion text) and takes the completion from where the
prompt's ids stop being a prefix; `encode` tokenises the two separately. With the project's prompt
convention (prompt ends with "\\n\\nAssistant:", response starts with a space) the byte-level BPE
never merges across that boundary, so the ids agree; `test_boundary_merge_*` shows where they do
not.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"

import copy  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from safealign.data.collate import PreferenceCollator, encode  # noqa: E402
from safealign.logps import IGNORE, concatenated_forward  # noqa: E402
from safealign.losses import dpo_loss, hinge_loss, ipo_loss  # noqa: E402
from safealign.models import build_tiny_gpt2, train_bpe_tokenizer  # noqa: E402

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

# transformers 5 renamed gradient checkpointing; TRL 1.16 still uses the old name internally.
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*gradient_checkpointing. is deprecated:FutureWarning"
)

BETA = 0.3
ATOL = 1e-5
MAX_LENGTH = 128  # longer than every row: no truncation on either side
ROWS = [
    ("How do I bake bread?", " Mix flour, water and yeast, then bake it.", " I will not help you."),
    ("What is the capital of France?", " Paris is the capital of France.", " Who cares, go away."),
    ("Tell me a joke.", " Why did the chicken cross the road? To get to the other side.", " No."),
    (
        "How can I sleep better?",
        " Keep a regular schedule, no screens late.",
        " Sleep is for the weak.",
    ),
    (
        "Can you help me with my homework?",
        " Sure, what is the question?",
        " Do it yourself, idiot.",
    ),
    (
        "Is it safe to swim after eating?",
        " Yes, a short wait is fine but not required.",
        " Nobody knows.",
    ),
]
PROMPTS = [f"\n\nHuman: {q}\n\nAssistant:" for q, _, _ in ROWS]
DATA = [
    {"prompt": p, "chosen": c, "rejected": r} for p, (_, c, r) in zip(PROMPTS, ROWS, strict=True)
]


def _perturbed(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """A copy of `model` moved by seeded noise: policy != reference, so rewards are non-zero."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    texts = [t for row in DATA for t in row.values()] * 3
    tok = train_bpe_tokenizer(texts, vocab_size=400, min_frequency=1, cache_dir=None)
    reference = build_tiny_gpt2(tok, n_layer=2, n_head=2, n_embd=32, n_positions=MAX_LENGTH, seed=0)
    policy = _perturbed(reference, seed=1, scale=0.05)
    return SimpleNamespace(
        tok=tok, reference=reference, policy=policy, tmp=tmp_path_factory.mktemp("trl")
    )


def _trainer(world, loss_type: str = "sigmoid", beta: float = BETA):
    # bf16=False: DPOConfig defaults to bf16=True, which autocasts the prepared reference model.
    args = trl.DPOConfig(
        output_dir=str(world.tmp / loss_type),
        beta=beta,
        loss_type=[loss_type],
        gradient_checkpointing=False,
        report_to=[],
        per_device_train_batch_size=4,
        max_length=MAX_LENGTH,
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    return trl.DPOTrainer(
        model=copy.deepcopy(world.policy),
        ref_model=copy.deepcopy(world.reference),
        args=args,
        train_dataset=datasets.Dataset.from_list(DATA),
        processing_class=world.tok,
    )


def _trl_step(trainer, batch: dict) -> SimpleNamespace:
    trainer.model.zero_grad()
    for logged in trainer._metrics.values():  # metrics of this call only
        logged.clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    mode = "train" if trainer.model.training else "eval"
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
    return SimpleNamespace(loss=loss.detach(), metrics=metrics, grads=grads)


def _safealign_step(
    world, batch: dict, labels: torch.Tensor, loss_fn, average: bool = False, beta: float = BETA,
    forward=concatenated_forward,
) -> SimpleNamespace:
    """safealign's path on the same ids: ``forward`` (policy, reference), loss, mean."""
    policy, reference = copy.deepcopy(world.policy), world.reference
    args = (batch["input_ids"], batch["attention_mask"], labels, 2, average)
    pol = forward(policy, *args)
    with torch.no_grad():
        ref = forward(reference, *args)
    out = loss_fn(pol, ref, beta=beta)
    loss = out.losses.mean()  # TRL reduces with a batch mean (docs/methods.md C.3)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters()}
    return SimpleNamespace(loss=loss.detach(), out=out, pol=pol, grads=grads)


def _trl_labels(batch: dict) -> torch.Tensor:
    """TRL's labels: input ids with -100 outside the completion (dpo_trainer `_compute_loss`)."""
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)


def _max_grad_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.fixture(scope="module")
def trl_dpo(world):
    trainer = _trainer(world)
    batch = next(iter(trainer.get_train_dataloader()))
    return SimpleNamespace(
        trainer=trainer, batch=batch, labels=_trl_labels(batch), result=_trl_step(trainer, batch)
    )


def test_dpo_loss_rewards_and_grads_match_trl(world, trl_dpo):
    ref, ours = trl_dpo.result, _safealign_step(world, trl_dpo.batch, trl_dpo.labels, dpo_loss)
    m = ref.metrics
    # The case is not degenerate: policy != reference, so the margin and loss move off log 2.
    assert abs(m["rewards/margins"]) > 1e-2
    diffs = {
        "loss": abs(ours.loss.item() - ref.loss.item()),
        "rewards/chosen": abs(ours.out.chosen_rewards.mean().item() - m["rewards/chosen"]),
        "rewards/rejected": abs(ours.out.rejected_rewards.mean().item() - m["rewards/rejected"]),
        "rewards/margins": abs(
            (ours.out.chosen_rewards - ours.out.rejected_rewards).mean().item()
            - m["rewards/margins"]
        ),
        "logps/chosen": abs(ours.pol.chosen.mean().item() - m["logps/chosen"]),
        "logps/rejected": abs(ours.pol.rejected.mean().item() - m["logps/rejected"]),
        "grad": _max_grad_diff(ours.grads, ref.grads),
    }
    print("\nTRL parity max abs diffs (DPO sigmoid):", {k: f"{v:.2e}" for k, v in diffs.items()})
    # log-prob sums are O(100): compare them relative to their size, everything else absolutely
    assert diffs["logps/chosen"] <= ATOL * abs(m["logps/chosen"])
    assert diffs["logps/rejected"] <= ATOL * abs(m["logps/rejected"])
    assert all(v <= ATOL for k, v in diffs.items() if not k.startswith("logps")), diffs
    accuracy = (ours.out.chosen_rewards > ours.out.rejected_rewards).float().mean().item()
    assert accuracy == m["rewards/accuracies"]


def test_parity_can_fail(world, trl_dpo):
    """The comparison has teeth: a wrong beta, or labels keeping the prompt, leave the tolerance."""
    ref, batch = trl_dpo.result, trl_dpo.batch
    wrong_beta = _safealign_step(world, batch, trl_dpo.labels, dpo_loss, beta=2 * BETA)
    assert abs(wrong_beta.loss.item() - ref.loss.item()) > 100 * ATOL
    # Prompt tokens are the same in the chosen and rejected rows, so their log-ratio cancels in h
    # and the DPO LOSS is (nearly) blind to a missing prompt mask; log-probs and rewards are not.
    unmasked = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    no_prompt_mask = _safealign_step(world, batch, unmasked, dpo_loss)
    assert abs(no_prompt_mask.loss.item() - ref.loss.item()) < 1e-4
    assert abs(no_prompt_mask.pol.chosen.mean().item() - ref.metrics["logps/chosen"]) > 1.0
    chosen_reward = no_prompt_mask.out.chosen_rewards.mean().item()
    assert abs(chosen_reward - ref.metrics["rewards/chosen"]) > 10 * ATOL  # beta * prompt ratio


@pytest.mark.parametrize("loss_type", ["hinge", "ipo"])
def test_hinge_and_ipo_match_trl(world, loss_type):
    trainer = _trainer(world, loss_type)
    batch = next(iter(trainer.get_train_dataloader()))
    ref = _trl_step(trainer, batch)
    # TRL's IPO divides each sequence's log-ratio by its completion length: average=True here.
    fn, average = (hinge_loss, False) if loss_type == "hinge" else (ipo_loss, True)
    ours = _safealign_step(world, batch, _trl_labels(batch), fn, average=average)
    assert ref.loss.item() > 0  # hinge not saturated: gradients are compared, not zeros
    diffs = {
        "loss": abs(ours.loss.item() - ref.loss.item()),
        "grad": _max_grad_diff(ours.grads, ref.grads),
    }
    print(f"\nTRL parity max abs diffs ({loss_type}):", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert all(v <= ATOL for v in diffs.values()), diffs


def test_encode_reproduces_trl_token_ids(world, trl_dpo):
    """safealign's separate prompt/response tokenisation == TRL's joint one, row by row."""
    trainer, tok = trl_dpo.trainer, world.tok
    rows = list(trainer.train_dataset)
    items = []
    for i, (row, raw) in enumerate(zip(rows, DATA, strict=True)):
        enc = {
            k: encode(tok, raw["prompt"], raw[k], MAX_LENGTH - 1, MAX_LENGTH)
            for k in ("chosen", "rejected")
        }
        for k in ("chosen", "rejected"):
            assert enc[k].input_ids == row["prompt_ids"] + row[f"{k}_ids"]
            assert enc[k].labels == [IGNORE] * len(row["prompt_ids"]) + row[f"{k}_ids"]
            assert not enc[k].truncated
        items.append((i, enc))
    ours = PreferenceCollator(pad_id=tok.pad_token_id)(items)
    theirs = trainer.data_collator(rows)
    for key in ("input_ids", "attention_mask"):
        torch.testing.assert_close(getattr(ours, key), theirs[key], rtol=0, atol=0)
    torch.testing.assert_close(ours.labels, _trl_labels(theirs), rtol=0, atol=0)
    # End to end through safealign's own batch: same loss and gradients as TRL on its batch.
    ref = _trl_step(trainer, theirs)
    mine = _safealign_step(world, ours._asdict(), ours.labels, dpo_loss)
    assert abs(mine.loss.item() - ref.loss.item()) <= ATOL
    assert _max_grad_diff(mine.grads, ref.grads) <= ATOL


def test_boundary_merge_is_where_joint_and_separate_tokenisation_differ(world):
    """A prompt ending in a space breaks the convention: jointly, " Keep" is one BPE token; apart,
    the space is stranded at the prompt's end. TRL then starts the completion where the ids diverge
    (dpo_trainer `common_prefix_length`); `encode` keeps the stranded space, so ids differ."""
    tok = world.tok
    prompt, response = "\n\nHuman: How can I sleep better?\n\nAssistant: ", "Keep calm."
    assert "ĠKeep" in tok.get_vocab()  # the merge exists in this vocabulary
    joint = tok(prompt + response)["input_ids"]
    separate = encode(tok, prompt, response, MAX_LENGTH - 1, MAX_LENGTH).input_ids[:-1]  # drop EOS
    assert joint != separate
    # With the convention (no trailing space; response starts with one) they agree.
    fixed = encode(tok, prompt.rstrip(), " " + response, MAX_LENGTH - 1, MAX_LENGTH).input_ids[:-1]
    assert tok(prompt.rstrip() + " " + response)["input_ids"] == fixed


def test_shared_prompt_forward_matches_trl(world, trl_dpo, monkeypatch):
    """The default path (method.shared_prompt: each pair's prompt run once, issue 12) is held to
    the same TRL tolerance, on TRL's own batch; falling back to the unshared path fails the test."""
    import safealign.shared_prompt as sp

    def no_fallback(*args, **kwargs):
        raise AssertionError("shared_prompt_forward fell back to the unshared forward")

    monkeypatch.setattr(sp, "concatenated_forward", no_fallback)
    ref = trl_dpo.result
    ours = _safealign_step(world, trl_dpo.batch, trl_dpo.labels, dpo_loss,
                           forward=sp.shared_prompt_forward)  # fmt: skip
    assert abs(ours.loss.item() - ref.loss.item()) <= ATOL
    assert _max_grad_diff(ours.grads, ref.grads) <= ATOL
    logps = abs(ours.pol.chosen.mean().item() - ref.metrics["logps/chosen"])
    assert logps <= ATOL * abs(ref.metrics["logps/chosen"])
