"""The stage runner shared by `train.py` experiments (the `init` SFT stage), the ADPO pipeline
and the demos: it runs or reuses each stage in the artefact store and is the one place that
reports a stage's status.

A stage config is the run config with some groups swapped (e.g. `init.data`, `init.method`); its
cache key is the resolved stage config minus where outputs go, so a β:γ sweep on the
preference stage reuses the same SFT stage.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from safealign.cache import DigestCache, without_cache_dirs
from safealign.errors import ConfigError
from safealign.fit import fit
from safealign.io import file_hash
from safealign.pipeline.store import ArtifactStore, attempt
from safealign.utils import rank_zero, seed_everything, terminal_quiet

log = logging.getLogger(__name__)
REPLACED = ("data", "method", "model")
# Keys of a run config that describe its stages, not one stage: no stage config carries them
# (`eval`: the run's end-of-run evaluation, conf/eval; no part of a stage's work or cache key).
STAGE_KEYS = ("init", "pipeline", "eval")
# Config keys whose existing paths are inputs: their content, not only their name, keys a stage.
INPUT_KEYS = ("path", "paths", "data_dir", "files", "name_or_path")
DIGESTS = ".digests.json"  # input sha256s by (path, size, mtime) under the store root
VOLATILE = ("paths", "hydra", "logger", "ckpt_path", "tags", "task_name", "optimized_metric")


def stage_config(cfg: DictConfig, stage: DictConfig) -> DictConfig:
    """The run config with the stage's groups swapped in: `data`, `method` and `model` REPLACE the
    run's (their keys differ per class), `trainer` and anything else are merged as overrides."""
    base = OmegaConf.to_container(cfg, resolve=False)
    for k in STAGE_KEYS:
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
    c = without_cache_dirs(c)
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


def run_init_stage(cfg: DictConfig) -> Path:
    """Run (or reuse) the SFT stage described by `cfg.init`; returns its exported model dir."""
    return StageRunner(cfg).fit("sft", stage_config(cfg, cfg.init)) / "model"


def run_fit_stage(
    cfg: DictConfig, stage: str, scfg: DictConfig, key_fn: Callable[[dict], dict] | None = None
) -> tuple[Path, str]:
    """Fit `scfg` (a stage config) in the artefact store under `stage`; returns (stage dir,
    "reused" | "computed"). `key_fn` may rewrite the key (e.g. input paths -> their hashes)."""
    store = ArtifactStore(cfg.paths.artifacts_dir)

    def compute(work: Path) -> None:
        _progress(stage)
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


def portable(obj, subs: dict[str, str]):
    """``obj`` with every string that starts with a path in ``subs`` rewritten to its token, so a
    key names inputs by hash, not by where the artefact store or a given file happens to be."""
    if isinstance(obj, dict):
        return {k: portable(v, subs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v, subs) for v in obj]
    if isinstance(obj, str):
        for prefix, token in subs.items():
            if obj == prefix or obj.startswith(prefix.rstrip("/") + "/"):
                return token + obj[len(prefix) :]
    return obj


class StageRunner:
    """One run's stages: each is computed or reused in the artefact store under a portable key,
    recorded (status "computed" | "reused" | "given", dir, seconds) and reported in one line.

    ``outputs`` maps a stage to its output inside the stage dir (``"model"``, a JSONL file):
    downstream stages read ``paths[stage]`` and name it in their keys by ``hashes[stage]``."""

    def __init__(self, cfg: DictConfig, outputs: dict[str, str] | None = None):
        self.cfg, self.store = cfg, ArtifactStore(cfg.paths.artifacts_dir)
        self.outputs = outputs or {}
        self.statuses: dict[str, str] = {}
        self.dirs: dict[str, Path] = {}
        self.seconds: dict[str, float] = {}
        self.paths: dict[str, Path] = {}  # stage -> its output (model dir or JSONL file)
        self.hashes: dict[str, str] = {}  # stage -> what downstream keys name it by
        root = str(cfg.paths.artifacts_dir)
        self.subs = {root: "<artifacts>", str(Path(root).resolve()): "<artifacts>"}

    def given(self, stage: str, path: Path) -> None:
        """An output given explicitly instead of computed; keys name it by its content hash."""
        target = path / "model.safetensors" if self.outputs.get(stage) == "model" else path
        if not target.is_file():
            raise ConfigError(f"pipeline.inputs.{stage}", f"{target} does not exist")
        h = "given-" + file_hash(target)
        self.subs[str(path)] = f"<{h}>"
        self.paths[stage], self.hashes[stage] = path, h
        self.dirs[stage], self.statuses[stage] = path.parent, "given"
        _report(stage, "given", None, path)

    def run(self, stage: str, key: dict, compute, label: str | None = None) -> Path:
        """``store.get_or_compute`` under the portable ``key``; recorded under ``label``."""
        t0, name = time.perf_counter(), label or stage

        def announced(work: Path) -> None:
            _progress(name)
            compute(work)

        with terminal_quiet() as quiet:
            d, status = self.store.get_or_compute(stage, portable(key, self.subs), announced)
        self._record(name, d, status, t0, quiet["warnings"])
        return d

    def fit(self, stage: str, scfg: DictConfig) -> Path:
        """A training stage: key = its resolved stage config, input paths as their hashes."""
        t0 = time.perf_counter()
        with terminal_quiet() as quiet:
            d, status = run_fit_stage(self.cfg, stage, scfg, lambda k: portable(k, self.subs))
        self._record(stage, d, status, t0, quiet["warnings"])
        return d

    def _record(self, label: str, d: Path, status: str, t0: float, warnings: int = 0) -> None:
        name = label.split("/")[0]
        if name in self.outputs:
            self.paths[name], self.hashes[name] = d / self.outputs[name], d.name
        self.dirs[label], self.statuses[label] = d, status
        self.seconds[label] = round(time.perf_counter() - t0, 2)
        _report(label, status, self.seconds[label], d, warnings)


def _progress(stage: str) -> None:
    # The stage's one progress line; the next line replaces it on a TTY (utils.TerminalHandler).
    log.info("stage %-14s running ...", stage, extra={"transient": True})


def _report(stage: str, status: str, seconds: float | None, where: Path, warnings: int = 0) -> None:
    took = "-" if seconds is None else f"{seconds:.1f}s"
    # The stage's own lines went to the log file only (utils.terminal_quiet): say if it warned.
    note = f"  ({warnings} warning(s): see the run's log file)" if warnings else ""
    log.info("stage %-14s %-8s %8s  %s%s", stage, status, took, where, note)


def _stage_checkpoint(s: DictConfig, work: Path) -> str | None:
    """The newest checkpoint an interrupted attempt left in the work dir (a requeued SFT stage
    continues where it stopped instead of restarting from step 0), else None."""
    from safealign.resume import checkpoint_dir, newest_checkpoint

    found = newest_checkpoint(checkpoint_dir(s), work)
    if found is not None:
        log.warning("stage resumes from %s (attempt %d)", found, attempt(work))
    return str(found) if found is not None else None
