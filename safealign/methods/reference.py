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
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

from safealign.cache import FileCache, FileFormat, arrays_sha256
from safealign.logps import concatenated_forward, single_forward
from safealign.types import PreferenceBatch, SeqLogps

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
    shared_prompt: bool = False,
) -> str:
    """Cache key. The exact weights are hashed only when the model is not sharded (a ZeRO-3 or
    FSDP shard is not the model); the source identity covers the sharded case. The shared-prompt
    forward rounds differently, so it keys its own entry (absent from unshared keys, which stay
    what they were before it existed)."""
    from safealign.sharding import is_sharded

    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    weights = "sharded" if is_sharded(model) else weights_hash(model)
    parts = [weights, json.dumps(source or {}, sort_keys=True), vocab[:16], data_hash(encoded),
             f"avg={average}", f"tox={toxic}", f"precision={precision}"]  # fmt: skip
    if shared_prompt:
        parts.append("shared_prompt")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def pi_t_logps(model, batch: PreferenceBatch, average: bool) -> Tensor | None:
    """``model``'s log-probs of the toxic response after prompt + [TOXIC] (``batch.toxic_ctx``):
    pi_t when ``model`` holds the SFT weights (A.3). Shape: (B,); None for a two-way batch."""
    if batch.toxic_ctx is None:
        return None
    return single_forward(model, *batch.toxic_ctx, average)


@torch.no_grad()  # not inference_mode: FSDP2 all-gathers write into its buffers in place
def compute_reference(
    model,
    loader: Iterable[PreferenceBatch],
    average: bool,
    device: torch.device,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    on_batch: Callable[[], None] | None = None,
    pair_forward: Callable[..., SeqLogps] = concatenated_forward,
) -> dict[str, Tensor]:
    """Reference logps for the batches ``loader`` yields (this rank's share), in loader order,
    with their example indices under "index": pi_ref on [chosen; rejected], pi_t on the toxic
    context (frozen SFT weights, A.3). Runs under ``forward_context()`` (the precision plugin's
    autocast), so the numbers are the ones the policy reproduces at step 0. ``on_batch`` is
    called between batches (stop-signal checks); ``pair_forward``: the policy's chosen/rejected
    forward (shared-prompt or not), so step 0 reproduces these numbers. Shape of each: (rows,)."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from safealign.sharding import eval_mode

    out: dict[str, list[Tensor]] = {"index": [], "chosen": [], "rejected": [], "toxic": []}
    with eval_mode(model):
        for batch in loader:
            batch = move_data_to_device(batch, device)
            with forward_context():
                ref = pair_forward(model, *batch.chosen_rejected(), 2, average)
                toxic = pi_t_logps(model, batch, average)
            out["index"].append(batch.index.cpu())
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
    collate: Callable[[list], PreferenceBatch],
    batch_size: int,
    average: bool,
    device: torch.device,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    on_batch: Callable[[], None] | None = None,
    pair_forward: Callable[..., SeqLogps] = concatenated_forward,
) -> dict[str, Tensor]:
    """Reference logps of every row of ``items`` ((index, encoded) pairs, index = position; the
    data module's ``indexed_rows``), each rank scoring an equal share (sharded forwards are
    collective), gathered on all ranks. Shape of each: (len(items),), ordered by index."""
    from torch.utils.data import DataLoader

    from safealign.ranks import global_rank, world_size
    from safealign.sharding import gather_by_index, shard_indices

    share = [items[i] for i in shard_indices(len(items), global_rank(), world_size())]
    loader = DataLoader(share, batch_size=batch_size, shuffle=False, collate_fn=collate)
    local = compute_reference(
        model, loader, average, device, forward_context, on_batch, pair_forward
    )
    index = local.pop("index")
    return gather_by_index(local, index, len(items), device)


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


def _save_safetensors(path: Path, flat: dict[str, Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(flat, str(path), metadata=meta)


def _load_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors.torch import load_file, safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


# One file per key: the flat "split/field" tensors, with the key and their sha256 (the tensors'
# names, dtypes, shapes and bytes: `cache.arrays_sha256`) in the safetensors metadata.
_CACHE = FileCache(
    FileFormat(_save_safetensors, _load_safetensors, arrays_sha256, "tensors"), "reference cache"
)


def _nest(flat: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    cache: dict[str, dict[str, Tensor]] = {}
    for name, t in flat.items():
        split, field = name.split("/")
        cache.setdefault(split, {})[field] = t
    return cache


def _unusable(flat: dict[str, Tensor], sizes: dict[str, int]) -> str | None:
    cache = _nest(flat)
    if (why := implausible(cache)) is not None:
        return why
    for split, n in sizes.items():
        if n and (split not in cache or len(cache[split].get("chosen", ())) != n):
            return f"no {n} rows of {split!r} log-probs"
    return None


def load_cache(path: Path, key: str, sizes: dict[str, int]) -> dict[str, dict[str, Tensor]] | None:
    """The cached tensors, or None when absent, unreadable, not for this exact key and data
    (`sizes`: rows per split), not the bytes saved (sha256 in the metadata) or not plausible
    log-probs (:func:`implausible`). Verified by `safealign.cache.FileCache`."""
    flat = _CACHE.load(path, key, check=lambda f: _unusable(f, sizes))
    return _nest(flat) if flat is not None else None


def save_cache(path: Path, key: str, cache: dict[str, dict[str, Tensor]]) -> None:
    """Write `cache` atomically with its key and sha256, under the entry's lock."""
    flat = {f"{s}/{f}": t.contiguous() for s, fields in cache.items() for f, t in fields.items()}
    _CACHE.save(path, key, flat)
