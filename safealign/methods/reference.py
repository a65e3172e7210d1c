"""Reference log-probs precomputed once and cached on disk (issue 3 item 4; USER-ASKS #1).

Computed under the run's own strategy and precision (issue 9 item 1): after the strategy has set
up the model (sharded under ZeRO-3/FSDP), inside the precision plugin's autocast, each rank
scoring its share of the rows and all ranks gathering the result, so step 0's policy log-probs
equal the cached reference.

The cache key hashes everything that determines the numbers: where the weights come from
(:func:`source_identity`: the model factory's settings and the source weight files; plus the
exact weights when the model is not sharded: a sharded tensor is never hashed), the tokenizer,
the encoded data (token ids of every row, so lengths, truncation and the `[TOXIC]` placement are
all in it), the log-prob convention and the precision. A cache whose key, split names or row
counts do not match is never used; files are written to a temp path and renamed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
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


def _file_digest(path: Path) -> str:
    """Name, size and the first and last MiB of a weight file: changes whenever the weights do
    (safetensors headers and tensor bytes), without reading gigabytes."""
    h = hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(2**20))
        f.seek(max(0, path.stat().st_size - 2**20))
        h.update(f.read(2**20))
    return h.hexdigest()[:16]


def _model_dir(name_or_path) -> Path | None:
    """A local model dir, or a hub id's cached snapshot dir (its files identify the weights)."""
    if not name_or_path:
        return None
    if Path(str(name_or_path)).is_dir():
        return Path(str(name_or_path))
    from safealign.models.checks import cached_snapshot_dir

    return cached_snapshot_dir(str(name_or_path))


def source_identity(model_factory: Callable | None) -> dict:
    """Where the initial weights come from: the factory and its settings (seed, LoRA, dtype...)
    and, for a local model directory, a digest of its config and weight files."""
    if model_factory is None:
        return {}
    func = getattr(model_factory, "func", model_factory)
    kwargs = dict(getattr(model_factory, "keywords", {}) or {})
    ident = {
        "factory": f"{func.__module__}.{func.__qualname__}",
        "settings": repr(sorted(kwargs.items())),
    }
    src = _model_dir(kwargs.get("name_or_path"))
    if src is not None:
        files = sorted(src.glob("*.safetensors")) + sorted(src.glob("config.json"))
        ident["files"] = {f.name: _file_digest(f) for f in files}
    return ident


def reference_key(
    model,
    tokenizer,
    encoded: dict[str, list],
    average: bool,
    toxic: bool,
    source: dict | None = None,
    precision: str = "32-true",
) -> str:
    """Cache key. The exact weights are hashed only when the model is not sharded (a ZeRO-3 or
    FSDP shard is not the model); the source identity covers the sharded case."""
    from safealign.sharding import is_sharded

    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    weights = "sharded" if is_sharded(model) else weights_hash(model)
    parts = [weights, json.dumps(source or {}, sort_keys=True), vocab[:16], data_hash(encoded),
             f"avg={average}", f"tox={toxic}", f"precision={precision}"]  # fmt: skip
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


@torch.no_grad()  # not inference_mode: FSDP2 all-gathers write into its buffers in place
def compute_reference(
    model,
    loader,
    average: bool,
    device: torch.device,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    on_batch: Callable[[], None] | None = None,
) -> dict[str, Tensor]:
    """Reference logps for the rows ``loader`` yields (this rank's share), in loader order, with
    their example indices under "index". Runs under ``forward_context()`` (the precision plugin's
    autocast), so the numbers are the ones the policy reproduces at step 0. ``on_batch`` is
    called between batches (stop-signal checks). Shape of each: (rows,)."""
    from safealign.sharding import eval_mode

    out: dict[str, list[Tensor]] = {"index": [], "chosen": [], "rejected": [], "toxic": []}
    with eval_mode(model):
        for batch in loader:
            b = {k: v.to(device) for k, v in batch.items()}
            n = b["index"].numel()
            ids, mask, labels = (b[k][: 2 * n] for k in ("input_ids", "attention_mask", "labels"))
            with forward_context():
                ref = concatenated_forward(model, ids, mask, labels, 2, average)
                toxic = None
                if "toxic_ctx_input_ids" in b:  # pi_t(y_t | x ⊕ [TOXIC]), frozen SFT weights (A.3)
                    args = (b[f"toxic_ctx_{k}"] for k in ("input_ids", "attention_mask", "labels"))
                    toxic = single_forward(model, *args, average)
            out["index"].append(b["index"].cpu())
            out["chosen"].append(ref.chosen.float().cpu())
            out["rejected"].append(ref.rejected.float().cpu())
            if toxic is not None:
                out["toxic"].append(toxic.float().cpu())
            if on_batch is not None:
                on_batch()
    return {k: torch.cat(v) for k, v in out.items() if v}


def sharded_reference(
    model,
    items: list,
    collate,
    batch_size: int,
    average: bool,
    device: torch.device,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    on_batch: Callable[[], None] | None = None,
) -> dict[str, Tensor]:
    """Reference logps of every row of ``items`` ((index, encoded) pairs, index = position),
    each rank scoring an equal share (sharded forwards are collective), gathered on all ranks.
    Shape of each: (len(items),), ordered by index."""
    from torch.utils.data import DataLoader

    from safealign.ranks import global_rank, world_size
    from safealign.sharding import gather_by_index, shard_indices

    share = [items[i] for i in shard_indices(len(items), global_rank(), world_size())]
    loader = DataLoader(share, batch_size=batch_size, shuffle=False, collate_fn=collate)
    local = compute_reference(model, loader, average, device, forward_context, on_batch)
    index = local.pop("index")
    return gather_by_index(local, index, len(items), device)


def tensors_sha256(flat: dict[str, Tensor]) -> str:
    """sha256 of named tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(flat):
        t = flat[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def implausible(cache: dict[str, dict[str, Tensor]]) -> str | None:
    """Why cached reference log-probs cannot be real, or None: each is a sum or mean of
    log-softmax values, so finite and <= 0 (a 1e-3 slack for rounding in reduced precision)."""
    for split, fields in sorted(cache.items()):
        for field, t in sorted(fields.items()):
            if not t.is_floating_point():
                continue
            if not torch.isfinite(t).all():
                return f"{split}/{field} has {int((~torch.isfinite(t)).sum())} non-finite values"
            if t.numel() and t.max() > 1e-3:
                return f"{split}/{field} has a positive log-prob ({t.max().item():.4g})"
    return None


def load_cache(path: Path, key: str, sizes: dict[str, int]) -> dict[str, dict[str, Tensor]] | None:
    """The cached tensors, or None when absent, unreadable, not for this exact key and data, not
    the bytes saved (sha256 in the metadata) or not plausible log-probs (:func:`implausible`)."""
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
    if meta.get("sha256") != tensors_sha256(flat):
        why = "no sha256 recorded" if "sha256" not in meta else "tensors differ from their sha256"
        log.warning("reference cache %s: %s; recomputing", path, why)
        return None
    cache: dict[str, dict[str, Tensor]] = {}
    for name, t in flat.items():
        split, field = name.split("/")
        cache.setdefault(split, {})[field] = t
    if (why := implausible(cache)) is not None:
        log.warning("reference cache %s: %s; recomputing", path, why)
        return None
    ok = all(s in cache and len(cache[s]["chosen"]) == n for s, n in sizes.items() if n)
    return cache if ok else None


def save_cache(path: Path, key: str, cache: dict[str, dict[str, Tensor]]) -> None:
    from safetensors.torch import save_file

    flat = {f"{s}/{f}": t.contiguous() for s, fields in cache.items() for f, t in fields.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={"key": key, "sha256": tensors_sha256(flat)})
