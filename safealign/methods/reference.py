"""Reference log-probs precomputed once and cached on disk (issue 3 item 4; USER-ASKS #1).

The cache key hashes everything that determines the numbers: the reference weights, the
tokenizer, the encoded data (token ids of every row, so lengths, truncation and the `[TOXIC]`
placement are all in it) and the log-prob convention. A cache whose key, split names or row
counts do not match is never used; files are written to a temp path and renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import Tensor

from safealign.io import atomic_path
from safealign.logps import concatenated_forward, single_forward

log = logging.getLogger(__name__)


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def data_hash(encoded: dict[str, list]) -> str:
    """Hash of every encoded row's token ids and labels, split by split."""
    h = hashlib.sha256()
    for split in sorted(encoded):
        h.update(split.encode())
        for row in encoded[split]:
            for name in sorted(row):
                h.update(name.encode())
                h.update(json.dumps([row[name].input_ids, row[name].labels]).encode())
    return h.hexdigest()[:16]


def reference_key(model, tokenizer, encoded: dict[str, list], average: bool, toxic: bool) -> str:
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    parts = [weights_hash(model), vocab[:16], data_hash(encoded), f"avg={average}", f"tox={toxic}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


@torch.inference_mode()
def compute_reference(model, loader, average: bool, device: torch.device) -> dict[str, Tensor]:
    """Reference logps for one split, ordered by example index. Shape of each: (N,)."""
    was_training = model.training
    model.eval()
    out: dict[str, list[Tensor]] = {"index": [], "chosen": [], "rejected": [], "toxic": []}
    for batch in loader:
        b = {k: v.to(device) for k, v in batch.items()}
        n = b["index"].numel()
        ids, mask, labels = (b[k][: 2 * n] for k in ("input_ids", "attention_mask", "labels"))
        ref = concatenated_forward(model, ids, mask, labels, 2, average)
        out["index"].append(b["index"].cpu())
        out["chosen"].append(ref.chosen.float().cpu())
        out["rejected"].append(ref.rejected.float().cpu())
        if "toxic_ctx_input_ids" in b:  # pi_t(y_t | x ⊕ [TOXIC]) with the frozen SFT weights (A.3)
            args = (b["toxic_ctx_input_ids"], b["toxic_ctx_attention_mask"], b["toxic_ctx_labels"])
            out["toxic"].append(single_forward(model, *args, average).float().cpu())
    model.train(was_training)
    order = torch.cat(out["index"]).argsort()
    return {k: torch.cat(v)[order] for k, v in out.items() if v and k != "index"}


def load_cache(path: Path, key: str, sizes: dict[str, int]) -> dict[str, dict[str, Tensor]] | None:
    """The cached tensors, or None when absent, unreadable or not for this exact key and data."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        flat = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        log.warning("reference cache %s unreadable (%s): recomputing", path, e)
        return None
    if meta.get("key") != key:
        return None
    cache: dict[str, dict[str, Tensor]] = {}
    for name, t in flat.items():
        split, field = name.split("/")
        cache.setdefault(split, {})[field] = t
    ok = all(s in cache and len(cache[s]["chosen"]) == n for s, n in sizes.items() if n)
    return cache if ok else None


def save_cache(path: Path, key: str, cache: dict[str, dict[str, Tensor]]) -> None:
    from safetensors.torch import save_file

    flat = {f"{s}/{f}": t.contiguous() for s, fields in cache.items() for f, t in fields.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={"key": key})
