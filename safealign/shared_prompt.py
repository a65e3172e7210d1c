"""Shared-prompt forward: each pair's prompt runs once, chosen/rejected(/toxic) continue from it.

A drop-in for :func:`safealign.logps.concatenated_forward` (issue 12 item 1). The collator
tokenises and truncates the prompt identically for every branch of a pair
(safealign/data/collate.py), so the stacked [chosen; rejected(; toxic)] rows repeat the same
prompt n_way times; with long prompts and short responses most of the forward is that repeat.

Approach: ONE PACKED ROW PER PAIR with a block attention mask. Pair i's row is

    prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected (| prompt[-1] toxic) | padding

with explicit position ids (each branch restarts at len(prompt) - 1, as in its unshared row) and a
4D mask: prompt tokens attend causally within the prompt, a branch token attends to the prompt
and causally to its own branch only. Every scored token therefore sees exactly the keys and
positions it sees in the unshared forward, so log-probs and gradients agree to float rounding.
The prompt's LAST token is repeated per branch (n_way - 1 extra tokens per pair) so that each
branch is a self-contained segment whose logits at t predict its label at t+1: the existing
chunked :func:`safealign.logps.token_logps` reduces the packed row unchanged, and lm_head runs
only on the tail that holds the branches (`logits_to_keep`), never on B * len(prompt) positions.

Why not a KV cache (prompt forward with use_cache, expand the cache n_way times, branch forward
with past_key_values)? Under gradient checkpointing in training, transformers 5 drops the cache:
every `GradientCheckpointingLayer` sets `past_key_values=None` (modeling_layers.py) and GPT-2
passes None to its blocks, so the branches would silently not see the prompt at all; and
`DynamicCache.update` mutates the cache in place, which checkpoint recomputation would re-run.
The packed row is one ordinary forward call: gradient checkpointing, peft/LoRA wrappers,
DDP/FSDP hooks and `torch.no_grad` reference passes all see a normal model call.

Costs: dense attention computes the masked branch-to-branch blocks it then discards, the mask
is B * L * L bools (as transformers' own padded sdpa mask), and a 4D mask rules out
flash-attention kernels (attn_implementation must be eager or sdpa).

Fallback (one logged warning per reason, then :func:`concatenated_forward`): a model type not in
:data:`MODEL_TYPES` (checked to honour position_ids and a custom 4D mask: ALiBi models such as
Bloom/MPT derive positions from the 2D mask), another attention implementation, a packed row
longer than the model's sliding window (a custom 4D mask bypasses the window), left padding,
or rows of a pair whose prompts differ or are empty.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from safealign.logps import IGNORE, concatenated_forward, token_logps
from safealign.types import SeqLogps

log = logging.getLogger(__name__)

# transformers model types whose forward builds positions from `position_ids` (learned or RoPE)
# and passes a 4D attention mask through as-is (masking_utils._preprocess_mask_arguments).
# gpt2 and llama are tested against the unshared path (tests/test_shared_prompt.py), as are
# gpt_neox (Pythia), mistral and qwen2.
MODEL_TYPES = frozenset({"gpt2", "llama", "gpt_neox", "mistral", "qwen2"})
ATTENTION = frozenset({"eager", "sdpa"})
_warned: set[str] = set()


@dataclass(frozen=True)
class Packed:
    """One row per pair. Shapes: (B, L) except `allowed` (B, L, L) and the kept tail (B, K)."""

    input_ids: Tensor
    position_ids: Tensor
    allowed: Tensor  # (B, L, L) bool: query row, key column
    labels: Tensor  # (B, K) the last K = `keep` positions: every branch, some prompt
    branch: Tensor  # (B, K) branch index 0..n_way-1 of each kept position, n_way elsewhere
    keep: int


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("shared-prompt forward falls back to the unshared forward: %s", reason)


def _model_problem(model) -> str | None:
    config = model.config
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r} is not in {sorted(MODEL_TYPES)}"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ATTENTION:
        return f"attn_implementation {impl!r} takes no custom 4D mask (need eager or sdpa)"
    return None


def prompt_split(
    input_ids: Tensor, attention_mask: Tensor, labels: Tensor, n_way: int
) -> tuple[Tensor, Tensor] | str:
    """Prompt length per pair and response length per row, or why the batch cannot share.

    The prompt is a row's leading -100 labels (capped at its real length: an empty response).
    Returns (Shape: (B,), Shape: (n_way, B)) or a reason string.
    """
    rows, width = input_ids.shape
    pos = torch.arange(width, device=input_ids.device)
    lengths = attention_mask.sum(-1)
    if not torch.equal(attention_mask.bool(), pos < lengths[:, None]):
        return "the batch is not right-padded"
    scored = labels != IGNORE
    lead = torch.where(scored.any(-1), scored.int().argmax(-1), width)
    prompt = torch.minimum(lead, lengths).view(n_way, -1)
    p = prompt[0]
    ids = input_ids.view(n_way, -1, width)
    same = (prompt == p).all() and ((ids == ids[0]) | (pos >= p[:, None])).all()
    if not same:
        return "the rows of a pair have different prompt tokens"
    if (p < 1).any():
        return "a row has no prompt (no leading -100 label)"
    return p, lengths.view(n_way, -1) - p


def pack(input_ids: Tensor, labels: Tensor, p: Tensor, m: Tensor) -> Packed:
    """Lay out each pair as prompt[:-1] then, per branch, prompt[-1] and its response.

    Args:
        input_ids, labels: Shape: (n_way * B, T), stacked [chosen; rejected(; toxic)].
        p: prompt length per pair, Shape: (B,); m: response length per row, Shape: (n_way, B).
    """
    n_way, n_pairs = m.shape
    ids, labs = input_ids.view(n_way, n_pairs, -1), labels.view(n_way, n_pairs, -1)
    ends = (m + 1).T.cumsum(-1)  # (B, n) end of each branch after the prompt's first p-1 tokens
    length = int((p - 1 + ends[:, -1]).max())
    j = torch.arange(length, device=p.device)
    u = j - (p[:, None] - 1)  # (B, L) offset past prompt[:-1]; < 0 inside it
    in_prompt = u < 0
    branch = (u[..., None] >= ends[:, None, :]).sum(-1)  # (B, L) 0..n-1, n = padding
    seg = torch.where(in_prompt, 0, branch + 1)  # 0 prompt, k+1 branch k, n+1 padding
    valid = seg <= n_way
    k = branch.clamp(max=n_way - 1)
    start = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], -1).gather(1, k)
    col = torch.where(in_prompt, j, p[:, None] - 1 + u - start)  # column in the unshared row
    col = torch.where(valid, col, 0)
    row = torch.where(in_prompt, 0, k)
    pair = torch.arange(n_pairs, device=p.device)[:, None]
    seq_labels = torch.where(valid & ~in_prompt, labs[row, pair, col], IGNORE)
    causal = j[:, None] >= j[None, :]
    allowed = causal & ((seg[:, None, :] == 0) | (seg[:, :, None] == seg[:, None, :]))
    allowed = allowed & valid[:, None, :] & valid[:, :, None]
    # Padding queries attend to themselves: a fully masked row would give NaN that backward
    # could carry into the weight gradients (0 * NaN).
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=p.device)
    first = int(p.min()) - 1  # no pair's branches start earlier
    tail = seg[:, first:]
    return Packed(
        input_ids=ids[row, pair, col],
        position_ids=col,
        allowed=allowed,
        labels=seq_labels[:, first:],
        branch=torch.where((tail >= 1) & (tail <= n_way), tail - 1, n_way),
        keep=length - first,
    )


def _attention_mask(model, allowed: Tensor) -> Tensor:
    """The 4D mask in the form transformers builds for the implementation (masking_utils):
    bool for sdpa, additive float (0 / dtype min) in the embeddings' dtype for eager."""
    if model.config._attn_implementation == "sdpa":
        return allowed[:, None]
    dtype = model.get_input_embeddings().weight.dtype
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def shared_prompt_forward(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    n_way: int,
    average: bool = False,
) -> SeqLogps:
    """:func:`safealign.logps.concatenated_forward` with each pair's prompt run once.

    Same inputs (rows stacked [chosen; rejected(; toxic)], each block B rows, right-padded,
    labels -100 on prompt and padding) and the same values and gradients, to float rounding.
    Falls back to the unshared forward, with one warning, where sharing is not possible.

    Returns SeqLogps with each field Shape: (B,); `toxic` only when n_way == 3.
    """
    if n_way not in (2, 3) or input_ids.shape[0] % n_way:
        raise ValueError(f"batch of {input_ids.shape[0]} rows is not {n_way} equal blocks")
    split = _model_problem(model) or prompt_split(input_ids, attention_mask, labels, n_way)
    window = getattr(model.config, "sliding_window", None)
    if not isinstance(split, str):
        packed = pack(input_ids, labels, *split)
        if window is not None and packed.input_ids.shape[1] > window:
            split = f"a packed row is longer than the sliding window ({window})"
    if isinstance(split, str):
        _warn_once(split)
        return concatenated_forward(model, input_ids, attention_mask, labels, n_way, average)
    keep = {"logits_to_keep": packed.keep} if _accepts_logits_to_keep(model) else {}
    logits = model(
        input_ids=packed.input_ids,
        attention_mask=_attention_mask(model, packed.allowed),
        position_ids=packed.position_ids,
        use_cache=False,  # nothing is generated; a cache would only hold memory
        **keep,
    ).logits[:, -packed.keep :]  # (B, K, V)
    # Position t scores label t+1; the first label of every branch is the prompt's last token
    # (-100), so no branch's last logit leaks into the next branch's sum.
    tokens = token_logps(logits, packed.labels)  # (B, K)
    sums = tokens.new_zeros(tokens.shape[0], n_way + 1).scatter_add(1, packed.branch, tokens)
    if average:  # as sequence_logps: mean over the branch's scored tokens
        scored = (packed.labels != IGNORE).float()
        counts = scored.new_zeros(sums.shape).scatter_add(1, packed.branch, scored)
        sums = sums / counts.clamp(min=1)
    return SeqLogps(sums[:, 0], sums[:, 1], sums[:, 2] if n_way == 3 else None)
