"""Loss maths with hand-derived numbers (STYLE.md §2 principle 12) and the properties they promise.

Reference values below use log(1 + e^-1) = 0.313261687518..., log(1 + e) = 1.313261687518...,
log(1 + e^-2) = 0.126928011043..., log(1 + e^2) = 2.126928011043...;
-log sigma(x) = log(1 + e^-x).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from safealign.errors import ConfigError
from safealign.losses import (
    adpo_loss,
    adpo_loss_form_b,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    multi_target_loss,
    sft_loss,
)
from safealign.types import SeqLogps

SP1, SP_1 = math.log1p(math.exp(-1)), math.log1p(math.e)  # -log sigma(1), -log sigma(-1)
SP2, SP_2 = math.log1p(math.exp(-2)), math.log1p(math.exp(2))  # -log sigma(2), -log sigma(-2)
PREFERENCE_LOSSES = [dpo_loss, ipo_loss, hinge_loss, adpo_loss, adpo_loss_form_b]


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Two examples, beta = 0.5.
#   ex0: policy (chosen, rejected) = (-1, -3), reference (-2, -2): ratios (+1, -1),
#        h = 2, beta h = 1
#   ex1: policy (-4, -2), reference (-3, -3): ratios (-1, +1), h = -2, beta h = -1
# Toxic (ADPO, gamma = 0.2): ex0 policy -5, pi_t -10: p_t = 0.2 * 5 = 1
#                            ex1 policy -13, pi_t -3: p_t = 0.2 * -10 = -2
POLICY = SeqLogps(t(-1, -4), t(-3, -2), t(-5, -13))
REFERENCE = SeqLogps(t(-2, -3), t(-2, -3), t(-10, -3))


def random_logps(
    n: int, seed: int, toxic: bool = True, grad: bool = False
) -> tuple[SeqLogps, SeqLogps]:
    gen = torch.Generator().manual_seed(seed)
    fields = [(-30 * torch.rand(n, generator=gen, dtype=torch.float64)) for _ in range(6)]
    for f in fields[:3]:
        f.requires_grad_(grad)
    return SeqLogps(*fields[:2], fields[2] if toxic else None), SeqLogps(
        *fields[3:5], fields[5] if toxic else None
    )


def test_dpo_hand_values():
    out = dpo_loss(POLICY, REFERENCE, beta=0.5)
    assert_close(out.losses, t(SP1, SP_1))  # -log sigma(1), -log sigma(-1)
    assert_close(out.chosen_rewards, t(0.5, -0.5))  # beta * (+1, -1)
    assert_close(out.rejected_rewards, t(-0.5, 0.5))  # beta * (-1, +1)
    assert out.toxic_rewards is None


def test_cdpo_hand_values():
    # eps = 0.1: 0.9 * (-log sigma(x)) + 0.1 * (-log sigma(-x)); since
    # log sigma(-x) = log sigma(x) - x, that is -log sigma(x) + 0.1 x:
    # ex0 (x = 1) 0.31326 + 0.1, ex1 (x = -1) 1.31326 - 0.1.
    out = dpo_loss(POLICY, REFERENCE, beta=0.5, label_smoothing=0.1)
    assert_close(out.losses, t(SP1 + 0.1, SP_1 - 0.1))


def test_ipo_hand_values():
    # 1 / (2 beta) = 1: ex0 (2 - 1)^2 = 1, ex1 (-2 - 1)^2 = 9. Rewards as in DPO.
    out = ipo_loss(POLICY, REFERENCE, beta=0.5)
    assert_close(out.losses, t(1.0, 9.0))
    assert_close(out.chosen_rewards, t(0.5, -0.5))


def test_ipo_is_zero_at_its_target_margin():
    policy, reference = SeqLogps(t(0.25), t(-0.75)), SeqLogps(t(0.0), t(0.0))  # h = 1 = 1/(2 * 0.5)
    assert_close(ipo_loss(policy, reference, beta=0.5).losses, t(0.0))


def test_hinge_hand_values():
    # relu(1 - beta h): ex0 relu(1 - 1) = 0, ex1 relu(1 + 1) = 2.
    assert_close(hinge_loss(POLICY, REFERENCE, beta=0.5).losses, t(0.0, 2.0))


def test_adpo_form_a_hand_values():
    # logit = r_w - r_l - p_t: ex0 1 - 1 = 0 -> log 2; ex1 -1 - (-2) = 1 -> -log sigma(1).
    out = adpo_loss(POLICY, REFERENCE, beta=0.5, gamma=0.2)
    assert_close(out.losses, t(math.log(2), SP1))
    assert_close(out.toxic_rewards, t(1.0, -2.0))
    assert_close(out.chosen_rewards, t(0.5, -0.5))
    assert_close(out.rejected_rewards, t(-0.5, 0.5))


def test_adpo_form_b_hand_values():
    # -log sigma(beta h) - log sigma(-p_t): ex0 -log s(1) - log s(-1); ex1 -log s(-1) - log s(2).
    out = adpo_loss_form_b(POLICY, REFERENCE, beta=0.5, gamma=0.2)
    assert_close(out.losses, t(SP1 + SP_1, SP_1 + SP2))
    assert_close(out.toxic_rewards, t(1.0, -2.0))


def test_dpo_monotone_decreasing_in_beta_margin():
    h = torch.linspace(-6, 6, 25, dtype=torch.float64)
    zeros = torch.zeros_like(h)
    losses = dpo_loss(SeqLogps(h, zeros), SeqLogps(zeros, zeros), beta=0.5).losses
    assert (losses.diff() < 0).all()
    # and in beta, for a fixed positive margin
    one = t(1.0)
    by_beta = [
        dpo_loss(SeqLogps(one, t(0.0)), SeqLogps(t(0.0), t(0.0)), beta=b).losses
        for b in (0.1, 0.5, 2.0)
    ]
    assert by_beta[0] > by_beta[1] > by_beta[2]


def test_cdpo_is_minimised_at_a_finite_margin():
    # d/dx [-(1-e) log s(x) - e log s(-x)] = -(1-e) s(-x) + e s(x) = 0  <=>  x* = log((1 - e) / e).
    # That bounded optimum is the point of cDPO; eps = 0.2 gives x* = log 4.
    x = torch.linspace(0, 3, 3001, dtype=torch.float64)
    zeros = torch.zeros_like(x)
    losses = dpo_loss(
        SeqLogps(x, zeros), SeqLogps(zeros, zeros), beta=1.0, label_smoothing=0.2
    ).losses
    assert abs(x[losses.argmin()].item() - math.log(4)) < 1e-3


def test_reward_signs():
    # The policy raised y_w and lowered y_l relative to the reference.
    policy, reference = SeqLogps(t(-1.0), t(-5.0), t(-9.0)), SeqLogps(t(-2.0), t(-4.0), t(-3.0))
    for fn in PREFERENCE_LOSSES:
        out = fn(policy, reference, beta=0.3)
        assert out.chosen_rewards.item() > 0 > out.rejected_rewards.item()
    assert (
        adpo_loss(policy, reference, gamma=0.2).toxic_rewards.item() < 0
    )  # y_t already pushed down


def test_label_smoothing_zero_is_plain_sigmoid():
    policy, reference = random_logps(8, seed=3, toxic=False)
    h = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
    assert torch.equal(dpo_loss(policy, reference, beta=0.7).losses, -F.logsigmoid(0.7 * h))
    assert torch.equal(
        dpo_loss(policy, reference, beta=0.7, label_smoothing=0.0).losses, -F.logsigmoid(0.7 * h)
    )


def test_adpo_gamma_zero_is_exactly_dpo():
    policy, reference = random_logps(16, seed=0)
    adpo, dpo = (
        adpo_loss(policy, reference, beta=0.9, gamma=0.0),
        dpo_loss(policy, reference, beta=0.9),
    )
    assert torch.equal(adpo.losses, dpo.losses)
    assert torch.equal(adpo.chosen_rewards, dpo.chosen_rewards)
    assert torch.equal(adpo.rejected_rewards, dpo.rejected_rewards)


def test_adpo_form_b_gamma_zero_is_dpo_plus_log2():
    policy, reference = random_logps(16, seed=1)
    form_b, dpo = (
        adpo_loss_form_b(policy, reference, beta=0.9, gamma=0.0),
        dpo_loss(policy, reference, beta=0.9),
    )
    assert_close(form_b.losses, dpo.losses + math.log(2))


@pytest.mark.parametrize("fn", [adpo_loss, adpo_loss_form_b])
def test_adpo_gradient_pushes_toxic_down_and_chosen_up(fn):
    policy, reference = random_logps(8, seed=2, grad=True)
    fn(policy, reference, beta=0.3, gamma=0.2).losses.sum().backward()
    assert (policy.toxic.grad > 0).all()  # descent lowers log pi_theta(y_t | x)
    assert (policy.chosen.grad < 0).all()  # descent raises log pi_theta(y_w | x)
    assert (policy.rejected.grad > 0).all()


def test_form_a_toxic_gradient_is_gamma_times_sigmoid_of_minus_logit():
    # d/dt [-log sigma(z)] with z = beta h - gamma (t - a) is gamma * sigma(-z).
    policy, reference = random_logps(4, seed=5, grad=True)
    adpo_loss(policy, reference, beta=0.3, gamma=0.2).losses.sum().backward()
    with torch.no_grad():
        h = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
        z = 0.3 * h - 0.2 * (policy.toxic - reference.toxic)
    assert_close(policy.toxic.grad, 0.2 * torch.sigmoid(-z))


@pytest.mark.parametrize("fn", PREFERENCE_LOSSES)
def test_shapes_and_detached_rewards(fn):
    policy, reference = random_logps(5, seed=4, grad=True)
    out = fn(policy, reference, beta=0.2)
    assert out.losses.shape == out.chosen_rewards.shape == out.rejected_rewards.shape == (5,)
    assert out.losses.requires_grad and not out.chosen_rewards.requires_grad
    if out.toxic_rewards is not None:
        assert out.toxic_rewards.shape == (5,) and not out.toxic_rewards.requires_grad


@pytest.mark.parametrize("fn", [adpo_loss, adpo_loss_form_b])
def test_missing_toxic_raises(fn):
    policy, reference = random_logps(3, seed=0)
    with pytest.raises(ValueError, match="ADPO needs toxic responses"):
        fn(policy._replace(toxic=None), reference)
    with pytest.raises(ConfigError, match="method.needs_toxic"):
        fn(policy, reference._replace(toxic=None))


def test_label_smoothing_out_of_range_raises():
    policy, reference = random_logps(2, seed=0, toxic=False)
    with pytest.raises(ConfigError, match="label_smoothing"):
        dpo_loss(policy, reference, label_smoothing=0.7)


def test_hydra_partial_keys_are_the_keywords():
    from hydra.utils import instantiate

    policy, reference = random_logps(3, seed=6)
    fn = instantiate(
        {"_target_": "safealign.losses.adpo_loss", "_partial_": True, "beta": 0.3, "gamma": 0.0}
    )
    assert torch.equal(fn(policy, reference).losses, dpo_loss(policy, reference, beta=0.3).losses)
    with pytest.raises(TypeError):
        instantiate({"_target_": "safealign.losses.dpo_loss", "_partial_": True, "gama": 0.1})(
            policy, reference
        )


# ---------------------------------------------------------------- token-level losses


def t32(*values: float) -> torch.Tensor:
    """Token losses come out in float32: `sequence_logps` computes the log-softmax in float32."""
    return torch.tensor(values, dtype=torch.float32)


def brute_nll(logits: torch.Tensor, labels: torch.Tensor, row: int) -> float:
    """Mean NLL of labels[row, t+1] under logits[row, t] over unmasked t, one token at a time."""
    terms = []
    for pos in range(labels.shape[1] - 1):
        target = int(labels[row, pos + 1])
        if target != -100:
            terms.append(-torch.log_softmax(logits[row, pos].double(), -1)[target].item())
    return sum(terms) / len(terms) if terms else 0.0


def test_sft_loss_hand_value():
    # V = 2, labels [-100, 0, 1]. logits[0] = (log 3, 0) gives p(0) = 3/4 -> NLL log(4/3);
    # logits[1] = (0, 0) gives p(1) = 1/2 -> NLL log 2; logits[2] is never used.
    # Mean = log(8/3) / 2.
    logits = torch.tensor([[[math.log(3), 0.0], [0.0, 0.0], [9.0, -9.0]]], dtype=torch.float64)
    labels = torch.tensor([[-100, 0, 1]])
    assert_close(sft_loss(logits, labels), t32(math.log(8 / 3) / 2))


def test_sft_loss_ignores_prompt_positions():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 13, generator=gen)
    labels = torch.randint(0, 13, (2, 7), generator=gen)
    labels[:, :3] = -100  # prompt: positions 0..2; logits at 0..1 only predict prompt tokens
    labels[1, 6] = -100  # padding
    base = sft_loss(logits, labels)
    changed = logits.clone()
    changed[:, :2] = torch.randn(2, 2, 13, generator=gen) * 5
    changed[1, 5:] = 7.0  # logits at 5 predict the padded label 6; logits at 6 predict nothing
    assert_close(sft_loss(changed, labels), base)
    changed[:, 2] += torch.randn(
        2, 13, generator=gen
    )  # position 2 predicts the first response token
    assert not torch.allclose(sft_loss(changed, labels), base)
    assert_close(
        base, torch.tensor([brute_nll(logits, labels, r) for r in range(2)], dtype=base.dtype)
    )


def test_multi_target_loss_equals_brute_force():
    gen = torch.Generator().manual_seed(1)
    contexts, m, length, vocab = 3, 4, 6, 11
    logits = torch.randn(contexts * m, length, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (contexts * m, length), generator=gen)
    for row in range(contexts * m):
        labels[row, : 1 + row % 3] = -100  # prompts of different lengths
        labels[row, length - row % 2 :] = -100  # some right padding
    expected = [
        sum(brute_nll(logits, labels, c * m + j) for j in range(m)) / m for c in range(contexts)
    ]
    assert_close(multi_target_loss(logits, labels, m), t32(*expected))


def test_multi_target_loss_hand_value_and_empty_target():
    # Context 0: targets with NLL log 2 (uniform V=2) and log(4/3); mean = (log 2 + log 4/3) / 2.
    # Context 1: one real target (NLL log 2) and one fully truncated target, left out of the mean.
    logits = torch.zeros(4, 2, 2, dtype=torch.float64)
    logits[1, 0] = torch.tensor([math.log(3), 0.0])
    labels = torch.tensor([[-100, 1], [-100, 0], [-100, 0], [-100, -100]])
    expected = t32((math.log(2) + math.log(4 / 3)) / 2, math.log(2))
    assert_close(multi_target_loss(logits, labels, n_targets=2), expected)


def test_multi_target_loss_rejects_ragged_groups():
    with pytest.raises(ValueError, match="cannot be grouped"):
        multi_target_loss(torch.zeros(5, 3, 2), torch.zeros(5, 3, dtype=torch.long), n_targets=2)
