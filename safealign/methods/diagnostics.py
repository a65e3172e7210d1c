"""End-of-run diagnostics: does `[TOXIC]` shift the model toward unsafe responses? (ADPO A.1)

Perplexity of held-out safe vs unsafe responses, each with and without the control token in the
context. A working inner toxic model has ppl(unsafe | x⊕[TOXIC]) < ppl(unsafe | x) and
ppl(safe | x⊕[TOXIC]) > ppl(safe | x).
"""

from __future__ import annotations

import math

import torch

from safealign.data.collate import SFTCollator, encode
from safealign.data.control import with_control_token
from safealign.logps import single_forward
from safealign.types import SAFE, UNSAFE, DialogueExample


@torch.no_grad()  # not inference_mode: FSDP2 all-gathers write into its buffers in place
def response_ppl(model, tokenizer, pairs: list[tuple[str, str]], max_prompt: int, max_len: int) -> float:
    """Token-level perplexity of responses given prompts (pooled over all tokens)."""
    collate, nll, ntok = SFTCollator(tokenizer.pad_token_id), 0.0, 0
    encoded = [encode(tokenizer, p, r, max_prompt, max_len) for p, r in pairs]
    device = next(model.parameters()).device  # GPU runs: batches follow the model
    for i in range(0, len(encoded), 32):
        batch = {k: v.to(device) for k, v in collate(list(enumerate(encoded[i : i + 32]))).items()}
        logps = single_forward(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        nll -= float(logps.sum())
        ntok += int((batch["labels"][:, 1:] != -100).sum())
    return math.exp(nll / max(ntok, 1))


def control_token_shift(
    model, tokenizer, dialogues: list[DialogueExample], placement: str, max_prompt: int, max_len: int,
    limit: int = 200,
) -> dict[str, float]:
    """ppl/{safe,unsafe}/{plain,toxic} on up to `limit` examples per label, and the shift ratios."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for label in (SAFE, UNSAFE):
        rows = [d for d in dialogues if d.label == label][:limit]
        if not rows:
            continue
        plain = [(d.context, d.response) for d in rows]
        toxic = [(with_control_token(d.context, placement), d.response) for d in rows]
        out[f"ppl/{label}/plain"] = response_ppl(model, tokenizer, plain, max_prompt, max_len)
        out[f"ppl/{label}/toxic"] = response_ppl(model, tokenizer, toxic, max_prompt, max_len)
        # > 1 means the token makes this label MORE likely (lower ppl).
        out[f"shift/{label}"] = out[f"ppl/{label}/plain"] / out[f"ppl/{label}/toxic"]
    model.train(was_training)
    return out
