"""Per-sequence log-probs: one helper, one concatenated forward (STYLE.md principle 2).

Follows the DPO reference `_get_batch_logps` and TRL (docs/methods.md C.1): logits at t predict token
t+1, positions whose label is -100 (prompt, padding) are masked, per-token log-probs are summed
(or averaged, the IPO convention).

Memory (issue 10 item 5): log p(y_t) = logit[y_t] - logsumexp(logits_t) is computed a chunk of
scored positions at a time by :class:`_TokenLogps`, upcasting only that chunk to float32. Neither
pass holds an fp32 copy or a log-softmax of the whole (B, T, V) logits: the forward keeps one
float per position (the logsumexp) for backward, and backward writes the gradient chunk by
chunk into the one (B, T, V) tensor autograd needs anyway. Masked positions are never read.
TRL's `selective_log_softmax` loops over rows the same way but leaves backward to autograd (each
row's log-softmax is saved: the logits' size in total) and, for bf16 logits, works in bf16.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from safealign.types import SeqLogps

IGNORE = -100
# Logits per chunk. On CPU 1M floats (4 MiB, 8 rows of a 128k vocabulary) stay in cache across the
# passes over a chunk, which made chunking FASTER than one full-size log-softmax (bench/logps.py);
# on GPU larger chunks (64 MiB) keep kernel launches few.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}


def _segments(scored: Tensor) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive True in a 1-D mask: one per response, typically. Slices
    of these are views; index_select of scattered rows was 3-5x slower on CPU at V=32k."""
    edges = torch.diff(scored.int(), prepend=scored.new_zeros(1), append=scored.new_zeros(1))
    starts, stops = (edges == 1).nonzero()[:, 0].tolist(), (edges == -1).nonzero()[:, 0].tolist()
    return list(zip(starts, stops, strict=True))


class _TokenLogps(torch.autograd.Function):
    """log_softmax(logits)[target] at the positions where target != -100, 0 elsewhere.

    Shapes: logits (B, T, V) any float dtype; target (B, T); output (B, T) float32. Gradient wrt
    logits: g * (onehot(target) - softmax(logits)) at scored positions, 0 elsewhere.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, chunk: int) -> Tensor:
        flat = logits.reshape(-1, logits.shape[-1])  # a view for contiguous (model) logits
        labels = target.reshape(-1, 1)
        segments = _segments(labels[:, 0] != IGNORE)
        pieces = [(a, min(a + chunk, b)) for s, b in segments for a in range(s, b, chunk)]
        out = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.zeros_like(out)  # log Z per position, kept for backward: 4 bytes each
        for a, b in pieces:
            x, lab = flat[a:b], labels[a:b]  # (c, V) view, input dtype
            logp = torch.log_softmax(x.float(), -1).gather(1, lab)[:, 0]  # fp32 chunk only
            out[a:b] = logp  # bit for bit today's log_softmax(logits.float()) at these rows
            lse[a:b] = x.gather(1, lab)[:, 0].float() - logp
        ctx.save_for_backward(logits, labels, lse)
        ctx.segments, ctx.pieces = segments, pieces
        return out.view(target.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        logits, labels, lse = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        grad = torch.empty_like(flat)
        prev = 0
        for a, b in ctx.segments:  # unscored positions get exactly 0
            grad[prev:a].zero_()
            prev = b
        grad[prev:].zero_()
        g_all = grad_out.reshape(-1, 1).float()
        for a, b in ctx.pieces:
            g = g_all[a:b]
            x = flat[a:b].to(torch.float32, copy=True)  # never write into the logits
            x.sub_(lse[a:b, None]).exp_().mul_(-g)  # -g * softmax
            x.scatter_add_(1, labels[a:b], g)  # + g at the label
            grad[a:b].copy_(x)  # casts to the logits' dtype
        return grad.view_as(logits), None, None


def token_logps(logits: Tensor, labels: Tensor, chunk_elements: int | None = None) -> Tensor:
    """log p(label_{t+1} | <=t) per position, 0 where the next label is -100.

    Args:
        logits: Shape: (B, T, V), any float dtype; never upcast as a whole.
        labels: Shape: (B, T), -100 where ignored.
        chunk_elements: logits upcast at once (whole rows of V); sets the extra memory. Default:
            :data:`CHUNK_ELEMENTS` for the device type (the CUDA value elsewhere).

    Returns:
        Shape: (B, T) float32; the last column is 0 (nothing follows it).
    """
    # Shift the labels, not the logits: a logits[:, :-1] view would make autograd allocate a
    # second full-size gradient to scatter the sliced one back.
    target = torch.full_like(labels, IGNORE)
    target[:, :-1] = labels[:, 1:]
    if chunk_elements is None:
        chunk_elements = CHUNK_ELEMENTS.get(logits.device.type, CHUNK_ELEMENTS["cuda"])
    chunk = max(1, chunk_elements // logits.shape[-1])
    return _TokenLogps.apply(logits, target, chunk)


def sequence_logps(logits: Tensor, labels: Tensor, average: bool = False) -> Tensor:
    """Sum (or mean) of log p(label_t | <t) over unmasked positions.

    Args:
        logits: Shape: (B, T, V).
        labels: Shape: (B, T), -100 where ignored.
        average: mean over unmasked tokens instead of sum.

    Returns:
        Shape: (B,) float32.
    """
    # [:, :-1]: the same (B, T-1) reduction as before issue 10, so the sums agree bit for bit
    total = token_logps(logits, labels)[:, :-1].sum(-1)
    if not average:
        return total
    return total / (labels[:, 1:] != IGNORE).sum(-1).clamp(min=1)


def concatenated_forward(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    n_way: int,
    average: bool = False,
) -> SeqLogps:
    """One forward over rows stacked [chosen; rejected(; toxic)] (each block B rows).

    Returns SeqLogps with each field Shape: (B,); `toxic` only when n_way == 3.
    """
    if n_way not in (2, 3) or input_ids.shape[0] % n_way:
        raise ValueError(f"batch of {input_ids.shape[0]} rows is not {n_way} equal blocks")
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (nB, T, V)
    logps = sequence_logps(logits, labels, average).chunk(n_way)
    return SeqLogps(logps[0], logps[1], logps[2] if n_way == 3 else None)


def single_forward(
    model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, average: bool = False
) -> Tensor:
    """Per-sequence log-probs of one block of rows. Shape: (B,)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return sequence_logps(logits, labels, average)
