"""Losses as small pure functions of per-sequence log-probs (STYLE.md §2 principles 1-3).

Preference losses take ``policy`` and ``reference`` :class:`SeqLogps` (each field Shape: (B,)) plus
keyword-only hyper-parameters, and return a :class:`LossOut` of per-example losses (no reduction:
the module takes the mean) and implicit rewards. Hydra selects them with
``{_target_: safealign.losses.<name>, _partial_: true, beta: ...}``, so the keyword names below are
the config keys. Rewards are detached: they are metrics (TRL and the DPO reference do the same).

Vocabulary follows the DPO reference: ``h`` is the DPO logit before scaling,
h = (log pi_theta(y_w) - log pi_ref(y_w)) - (log pi_theta(y_l) - log pi_ref(y_l)) (docs/methods.md C.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from safealign.errors import ConfigError
from safealign.logps import IGNORE, sequence_logps
from safealign.types import LossOut, SeqLogps


def _dpo_margin(policy: SeqLogps, reference: SeqLogps, beta: float) -> tuple[Tensor, LossOut]:
    """h and the DPO rewards r = beta * log(pi_theta / pi_ref) (Rafailov et al. 2023, Eq. 5).

    Shared by every preference loss so that ADPO at gamma=0 is the same float computation as DPO.
    Returns h Shape: (B,) and a LossOut whose ``losses`` is a placeholder (h) to be replaced.
    """
    chosen_ratio = policy.chosen - reference.chosen  # (B,)
    rejected_ratio = policy.rejected - reference.rejected
    h = chosen_ratio - rejected_ratio
    return h, LossOut(h, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def _toxic_logps(policy: SeqLogps, reference: SeqLogps) -> tuple[Tensor, Tensor]:
    if policy.toxic is None or reference.toxic is None:
        raise ConfigError(
            "method.needs_toxic",
            "ADPO needs toxic responses; set data to a source with a `toxic` field (data=builtin_pref, "
            "or JSONL rows {prompt, chosen, rejected, toxic}) and method.needs_toxic=true, so batches "
            "carry [chosen; rejected; toxic] rows and a toxic_ctx",
        )
    return policy.toxic, reference.toxic


def dpo_loss(
    policy: SeqLogps, reference: SeqLogps, *, beta: float = 0.1, label_smoothing: float = 0.0
) -> LossOut:
    """Sigmoid DPO, Rafailov et al. 2023 Eq. 7: -log sigma(beta * h).

    With ``label_smoothing`` = eps > 0 this is conservative DPO (cDPO, Mitchell 2023 Eq. 3; TRL
    v0.8.6 form, docs/methods.md C.3): -(1 - eps) log sigma(beta h) - eps log sigma(-beta h). TRL HEAD
    moved label smoothing to the unbiased "robust" loss; this is the original form.

    Returns:
        LossOut; each field Shape: (B,); ``toxic_rewards`` is None.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ConfigError(
            "method.loss.label_smoothing", f"expected 0 <= eps <= 0.5, got {label_smoothing}"
        )
    h, out = _dpo_margin(policy, reference, beta)
    logits = beta * h
    losses = -F.logsigmoid(logits)
    if label_smoothing > 0:  # a branch, not eps * ..., so eps=0 is exactly plain sigmoid DPO
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return out._replace(losses=losses)


def ipo_loss(policy: SeqLogps, reference: SeqLogps, *, beta: float = 0.1) -> LossOut:
    """IPO, Azar et al. 2023 Eq. 17: (h - 1 / (2 beta))^2, beta being the paper's tau.

    IPO conventionally uses per-token AVERAGED log-probs (TRL normalises by the completion length,
    docs/methods.md C.1): configure the module to compute log-probs with ``average=True``; this function
    uses whatever it is given. Rewards are beta * log-ratio of those (averaged) log-probs.
    """
    h, out = _dpo_margin(policy, reference, beta)
    return out._replace(losses=(h - 1 / (2 * beta)) ** 2)


def hinge_loss(policy: SeqLogps, reference: SeqLogps, *, beta: float = 0.1) -> LossOut:
    """SLiC hinge (Zhao et al. 2023; DPO reference ``preference_loss``): relu(1 - beta * h)."""
    h, out = _dpo_margin(policy, reference, beta)
    return out._replace(losses=torch.relu(1 - beta * h))


def adpo_loss(
    policy: SeqLogps, reference: SeqLogps, *, beta: float = 0.3, gamma: float = 0.2
) -> LossOut:
    """ADPO Form A (docs/methods.md A.3, the default; [INFERRED], the paper's equation was not readable):

        L = -log sigma(r_w - r_l - p_t),  r = beta * log(pi_theta / pi_ref) on y_w, y_l,
        p_t = gamma * (log pi_theta(y_t | x) - log pi_t(y_t | x)).

    ``policy.toxic`` is log pi_theta(y_t | x) WITHOUT [TOXIC]; ``reference.toxic`` is
    log pi_t(y_t | x) = log pi_SFT(y_t | x + [TOXIC]) from the frozen inner toxic model. At
    gamma = 0 this is exactly :func:`dpo_loss` (same floats). The gradient w.r.t.
    log pi_theta(y_t|x) is gamma * sigma(-logit) > 0, so descent pushes the toxic likelihood down.

    Returns:
        LossOut with ``toxic_rewards`` = p_t; each field Shape: (B,).
    """
    toxic, toxic_anchor = _toxic_logps(policy, reference)
    h, out = _dpo_margin(policy, reference, beta)
    penalty = gamma * (toxic - toxic_anchor)  # p_t, (B,)
    losses = -F.logsigmoid(beta * h - penalty)
    return out._replace(losses=losses, toxic_rewards=penalty.detach())


def adpo_loss_form_b(
    policy: SeqLogps, reference: SeqLogps, *, beta: float = 0.3, gamma: float = 0.2
) -> LossOut:
    """ADPO Form B (docs/methods.md A.3, [INFERRED] alternative):

        L = -[log sigma(r_w - r_l) + log sigma(-p_t)].

    The toxic penalty has its own log-sigmoid. At gamma = 0 it is DPO + log 2 (sigma(0) = 1/2), NOT
    DPO: same gradients, shifted value. Form C (DPO + p_t, no sigmoid) is deliberately not
    implemented: it is unbounded below in log pi_theta(y_t|x), so the loss can be driven to -inf by
    collapsing the toxic likelihood, contradicting the paper's "more stable than DPO" claim.
    """
    toxic, toxic_anchor = _toxic_logps(policy, reference)
    h, out = _dpo_margin(policy, reference, beta)
    penalty = gamma * (toxic - toxic_anchor)
    losses = -F.logsigmoid(beta * h) - F.logsigmoid(-penalty)
    return out._replace(losses=losses, toxic_rewards=penalty.detach())


def sft_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example mean token NLL over positions whose label is not -100 (shifted like TRL).

    Args:
        logits: Shape: (B, T, V).
        labels: Shape: (B, T), -100 on prompt and padding.

    Returns:
        Shape: (B,). A row with no unmasked token gives 0.
    """
    return -sequence_logps(logits, labels, average=True)


def _check_groups(rows: int, n_targets: int) -> None:
    if n_targets < 1 or rows % n_targets:
        raise ValueError(f"{rows} rows cannot be grouped into contexts of {n_targets} targets")


def _mean_over_targets(per_target: Tensor, has_tokens: Tensor, n_targets: int) -> Tensor:
    """Per-context mean of per-target losses, rows grouped M = ``n_targets`` consecutive targets
    per context; a target with no unmasked token (``has_tokens`` False) is left out of its
    context's mean instead of counting as 0. Shapes: (B * M,) in, (B,) out."""
    per_target = per_target.view(-1, n_targets)  # (B, M)
    has_tokens = has_tokens.view(-1, n_targets).to(per_target.dtype)
    return (per_target * has_tokens).sum(-1) / has_tokens.sum(-1).clamp(min=1)


def multi_target_loss(logits: Tensor, labels: Tensor, n_targets: int) -> Tensor:
    """ISAAC multi-target loss (ISAAC Eq. 3; docs/methods.md B.5): for each context, the mean over its
    M targets of the per-target mean token NLL, prompt and padding masked with -100.

    Rows are grouped M consecutive targets per context: [c0t0, ..., c0t(M-1), c1t0, ...]. The
    authors' code SUMS over M and does not mask padding; we average (deviation, B.5). A target with
    no unmasked token (fully truncated) is left out of its context's mean instead of counting as 0.

    Args:
        logits: Shape: (B * M, T, V).
        labels: Shape: (B * M, T).
        n_targets: M.

    Returns:
        Shape: (B,).
    """
    _check_groups(logits.shape[0], n_targets)
    has_tokens = (labels[:, 1:] != IGNORE).any(-1)  # shifted like sft_loss
    return _mean_over_targets(sft_loss(logits, labels), has_tokens, n_targets)


def seq2seq_multi_target_loss(logits: Tensor, labels: Tensor, n_targets: int) -> Tensor:
    """The rephraser's loss (ISAAC Eq. 3 for the seq2seq rephraser, docs/methods.md B.3, B.5): per
    context, the mean over its M targets of the per-target mean token NLL, padding -100.

    Unlike a causal LM there is no shift: decoder position t predicts labels[t]. The authors'
    chitchat code sums over M and trains on pad tokens (labels not masked); both are noted
    deviations (B.5). A target with no unmasked token is left out of its context's mean.

    Args:
        logits: Shape: (B * M, T, V), rows grouped M consecutive targets per context.
        labels: Shape: (B * M, T), -100 on padding.
        n_targets: M.

    Returns:
        Shape: (B,).
    """
    _check_groups(logits.shape[0], n_targets)
    nll = F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none"
    )  # (B*M, T)
    mask = labels != IGNORE
    per_target = (nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B*M,)
    return _mean_over_targets(per_target, mask.any(-1), n_targets)
