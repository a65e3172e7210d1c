"""Stage runners shared by `train.py` experiments and the ADPO pipeline.

A stage config is the run config with some groups swapped (e.g. `init.data`, `init.method`); its
cache key is the resolved stage config minus where outputs go, so a β:γ sweep on the
preference stage reuses the same SFT stage.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from safealign.io import DigestCache
from safealign.pipeline.store import ArtifactStore, attempt
from safealign.utils import rank_zero, seed_everything

log = logging.getLogger("safealign.pipeline")
REPLACED = ("data", "method", "model")
# Config keys whose existing paths are inputs: their content, not only their name, keys a stage.
INPUT_KEYS = ("path", "paths", "data_dir", "files", "name_or_path")
DIGESTS = ".digests.json"  # input sha256s by (path, size, mtime) under the store root
VOLATILE = ("paths", "hydra", "logger", "ckpt_path", "tags", "task_name", "optimized_metric")


def stage_config(cfg: DictConfig, stage: DictConfig) -> DictConfig:
    """The run config with the stage's groups swapped in: `data`, `method` and `model` REPLACE the
    run's (their keys differ per class), `trainer` and anything else are merged as overrides."""
    base = OmegaConf.to_container(cfg, resolve=False)
    for k in ("init", "pipeline", "isaac_demo"):
        base.pop(k, None)
    stage = OmegaConf.to_container(stage, resolve=False)
    for group in REPLACED:
        if group in stage:
            base[group] = stage.pop(group)
    return OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(stage))


def stage_key(cfg: DictConfig) -> dict:
    """What determines a stage's outputs: its resolved config without output locations, plus the
    sha256 of every input file or dir it names (`input_sha256`, by config key): a data file
    changed in place is a new stage, not a silently reused one."""
    c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    root = (c.get("paths") or {}).get("artifacts_dir")
    for k in VOLATILE:
        c.pop(k, None)
    c.get("trainer", {}).pop("default_root_dir", None)
    c.get("trainer", {}).pop("callbacks", None)
    c.get("trainer", {}).pop("logger", None)
    c.get("trainer", {}).pop("enable_progress_bar", None)
    c = _drop_cache_dirs(c)
    digests = DigestCache(Path(root) / DIGESTS if root else None)
    inputs = {name: digests.content(p) for name, p in input_paths(c)}
    digests.save()
    return c | {"input_sha256": inputs} if inputs else c


def input_paths(obj, prefix: str = "") -> Iterator[tuple[str, Path]]:
    """(dotted config key, path) of every existing file or dir named under a key in INPUT_KEYS
    or ending in `_path` (a string or a list of strings)."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return
    for k, v in items:
        name = f"{prefix}{k}"
        if isinstance(k, str) and (k in INPUT_KEYS or k.endswith("_path")):
            for i, p in enumerate(v if isinstance(v, list) else [v]):
                found = _existing(p, k)
                if found is not None:
                    yield (name if not isinstance(v, list) else f"{name}.{i}"), found
        yield from input_paths(v, name + ".")


def _existing(p, key: str) -> Path | None:
    """A local file/dir, or for `name_or_path` a hub id's cached snapshot (so a newer snapshot
    of the same id gives a new key)."""
    if not isinstance(p, str) or not p:
        return None
    if Path(p).exists():
        return Path(p)
    if key == "name_or_path":
        from safealign.models.checks import cached_snapshot_dir

        return cached_snapshot_dir(p)
    return None


def _drop_cache_dirs(obj):
    # Caches (tokenizers, reference log-probs) are content-keyed: where they live never changes a
    # stage's outputs, so a fresh clone elsewhere or a tmp cache dir reuses the same artefacts.
    if isinstance(obj, dict):
        return {k: _drop_cache_dirs(v) for k, v in obj.items() if k != "cache_dir"}
    if isinstance(obj, list):
        return [_drop_cache_dirs(v) for v in obj]
    return obj


HF_LOADER = "safealign.models.load_causal_lm"
TOKENIZER_LOADER = "safealign.models.load_tokenizer"
# load_causal_lm options that describe HOW to train, not which weights: they survive a hand-off.
CARRIED = ("dtype", "lora", "attn_implementation", "gradient_checkpointing")


def hf_model_config(path: Path, model: DictConfig | None = None) -> DictConfig:
    """The `model` group of a stage that starts from the exported model in `path`.

    Only the weights path changes between stages (issue 9 item 4): a group that already loads
    from a path (`model=hf`) is kept whole, LoRA, dtype and every other setting included, with
    `name_or_path` pointed at `path`; a group built from config (`model=tiny`) becomes the hf
    loader carrying over the settings that still apply (the architecture and tokenizer now come
    from `path`). Dropping them made a LoRA DPO on a 7B model silently a full fine-tune."""
    path = str(path)
    src = OmegaConf.to_container(model, resolve=False) if model is not None else {}
    lm, tok = src.get("lm") or {}, src.get("tokenizer") or {}
    if tok.get("_target_") != TOKENIZER_LOADER:  # export saved the trained tokenizer beside it
        tok = {"_target_": TOKENIZER_LOADER, "_partial_": True}
    tok = dict(tok, name_or_path=path)
    if lm.get("_target_") == HF_LOADER:
        return OmegaConf.create(
            dict(src, name_or_path=path, tokenizer=tok, lm=dict(lm, name_or_path=path))
        )
    carried = {k: lm[k] for k in CARRIED if k in lm}
    lm = {"_target_": HF_LOADER, "_partial_": True, "name_or_path": path, **carried}
    lm["local_files_only"] = True  # the exported dir is local
    return OmegaConf.create({"name_or_path": path, "tokenizer": tok, "lm": lm})


def run_init_stage(cfg: DictConfig) -> tuple[Path, str]:
    """Run (or reuse) the SFT stage described by `cfg.init`; returns its exported model dir."""
    out, status = run_fit_stage(cfg, "sft", stage_config(cfg, cfg.init))
    return out / "model", status


def run_fit_stage(
    cfg: DictConfig, stage: str, scfg: DictConfig, key_fn: Callable[[dict], dict] | None = None
) -> tuple[Path, str]:
    """Fit `scfg` (a stage config) in the artefact store under `stage`; returns (stage dir,
    "reused" | "computed"). `key_fn` may rewrite the key (e.g. input paths -> their hashes)."""
    from safealign.run import fit  # local: run imports this module

    store = ArtifactStore(cfg.paths.artifacts_dir)

    def compute(work: Path) -> None:
        s = OmegaConf.merge(scfg, {"paths": {"output_dir": str(work)}})
        seed_everything(s.seed)
        ckpt = _stage_checkpoint(s, work)
        if rank_zero():
            fit(s, work, ckpt)
            return
        # Other ranks train in the shared work dir (sharded checkpoints) but keep their own end-
        # of-run files (metrics.json without rank 0's summary) out of what rank 0 commits.
        with tempfile.TemporaryDirectory(prefix=f"safealign-{stage}-rank") as scratch:
            fit(s, Path(scratch), ckpt)

    key = stage_key(scfg)
    return store.get_or_compute(stage, key_fn(key) if key_fn else key, compute)


def _stage_checkpoint(s: DictConfig, work: Path) -> str | None:
    """The newest checkpoint an interrupted attempt left in the work dir (a requeued SFT stage
    continues where it stopped instead of restarting from step 0), else None."""
    from safealign.resume import checkpoint_dir, newest_checkpoint

    found = newest_checkpoint(checkpoint_dir(s), work)
    if found is not None:
        log.warning("stage resumes from %s (attempt %d)", found, attempt(work))
    return str(found) if found is not None else None
