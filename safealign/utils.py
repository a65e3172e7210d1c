"""Run plumbing: rank-zero logging, required-key checks, run-dir records (config, git SHA, command)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from safealign.errors import ConfigError
from safealign.io import atomic_open

SECRET_MARKERS = ("api_key", "apikey", "token", "secret", "secrets", "password", "passwd")
REDACTED = "<redacted>"
# `key=value` inside a string: Hydra override lists and `hydra.job.override_dirname` (comma-joined)
_KEY = r"[+~]{0,2}[\w.@/-]+"
_OVERRIDE = re.compile(rf"(?P<key>{_KEY})=(?P<value>.*?)(?=,{_KEY}=|$)", re.DOTALL)


def rank_zero() -> bool:
    """True on the global rank-0 process (torchrun, SLURM, Lightning, MPI: safealign.ranks)."""
    from safealign.ranks import is_rank_zero

    return is_rank_zero()


# Loggers whose INFO lines the terminal shows: stage lines and results. Any other INFO line (data
# statistics, cache hits, library chatter) goes only to the run's log file; warnings of this
# package and every error show too. Extend with hydra.job_logging.handlers.terminal.show=[...].
TERMINAL = (
    "safealign.run",
    "safealign.resume",  # "resuming from <ckpt>": a user must see that a run continued
    "safealign.pipeline.stages",
    "safealign.pipeline.summary",
    "safealign.pipeline.demo",
    "safealign.eval",
    "safealign.report",
    "safealign.isaac.report",
)
# Libraries that print by themselves (a stream handler of their own, some with propagate off):
# Lightning's "lightning" handler printed every INFO line a second time, on stderr.
SELF_PRINTING = ("lightning", "lightning.pytorch", "lightning.fabric", "transformers")
# DeepSpeed adds its stdout handler at import, deep inside `save_pretrained`: too late to remove,
# so a filter on its logger (set before the import) hands its records to the root's handlers.
LATE_PRINTING = ("DeepSpeed",)


# What the terminal still shows while a stage computes (inside `terminal_quiet`): its status lines.
STAGE_LINES = ("safealign.pipeline.stages",)
# One Counter per open `terminal_quiet` (innermost last): the warnings it kept off the terminal.
# Process-wide, not a ContextVar: records logged from library threads must be quiet too.
_QUIET: list[Counter] = []


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@contextmanager
def terminal_quiet() -> Iterator[Counter]:
    """While open, the terminal shows only stage lines and errors: a stage's training summary,
    data statistics and warnings go to the run's log file alone (issue 11 item 5, a clean
    `make demo` screen). Yields a Counter whose ``"warnings"`` the caller can report."""
    counts: Counter = Counter()
    _QUIET.append(counts)
    try:
        yield counts
    finally:
        _QUIET.remove(counts)


class TerminalFilter(logging.Filter):
    """What the terminal shows: INFO from the `show` loggers and this package's warnings, on
    rank zero only (every rank runs the same stages), and every rank's errors."""

    def __init__(self, show: tuple[str, ...] | list[str] = TERMINAL):
        super().__init__()
        self.show = tuple(show)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if not _under(record.name, ("safealign",)) or not rank_zero():
            return False
        if _QUIET and not _under(record.name, STAGE_LINES):
            _QUIET[-1]["warnings"] += record.levelno >= logging.WARNING
            return False
        return record.levelno >= logging.WARNING or _under(record.name, self.show)


class TerminalFormatter(logging.Formatter):
    """The message alone (a stage line, a table); warnings and errors say what they are."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


class TerminalHandler(logging.StreamHandler):
    """A stream handler whose ``transient`` records (``extra={"transient": True}``, e.g. "stage
    sft running") are overwritten in place by the next line on a TTY: one progress line per stage.
    Elsewhere (a pipe, a file) they are ordinary lines."""

    def __init__(self, stream=None) -> None:
        super().__init__(stream)
        self._pending = False  # a transient line is on screen

    def emit(self, record: logging.LogRecord) -> None:
        tty = getattr(self.stream, "isatty", lambda: False)()
        if not tty:
            return super().emit(record)
        transient = getattr(record, "transient", False)
        self.terminator = "" if transient else "\n"
        if self._pending:
            self.stream.write("\r\x1b[K")  # carriage return + erase line
        self._pending = transient
        super().emit(record)


def terminal_handler(show: tuple[str, ...] | list[str] = TERMINAL) -> logging.Handler:
    """The one terminal handler (stdout), for Hydra's job_logging and the argparse entry points;
    the run's log file gets every record (conf/hydra/job_logging/safealign.yaml)."""
    handler = TerminalHandler(sys.stdout)
    handler.setFormatter(TerminalFormatter("%(message)s"))
    handler.addFilter(TerminalFilter(show))
    return handler


class _ToRootHandlers(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        logging.getLogger().handle(record)  # the run's handlers decide where it goes
        return False  # never the library's own handler


def adopt_library_loggers() -> None:
    """Send the records of libraries that print by themselves to the root's handlers (the log
    file; the terminal filter keeps them off screen). A no-op when nothing configured logging
    (safealign used as a library). Lightning and transformers add their handlers at import:
    called again once they are imported (`seed_everything`, `safealign.fit.build`)."""
    root = logging.getLogger()
    if not root.handlers:
        return
    for name in SELF_PRINTING:
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if type(h) is logging.StreamHandler]:
            lg.removeHandler(h)
        lg.propagate = True
    for name in LATE_PRINTING:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _ToRootHandlers) for f in lg.filters):
            lg.addFilter(_ToRootHandlers())
    if any(isinstance(f, TerminalFilter) for h in root.handlers for f in h.filters):
        logging.captureWarnings(True)  # deprecation warnings and tips: into the log file


def setup_logging(level: int = logging.INFO) -> None:
    """`safealign` loggers at `level`; library loggers adopted by the run's handlers. (Rank zero
    is the terminal's filter: a filter on the "safealign" logger never sees its children.)"""
    logging.getLogger("safealign").setLevel(level)
    adopt_library_loggers()
    # Weight loading/writing bars ("Loading weights", "Writing model shards") are not a stage's
    # progress: off unless the user asked for them (HF_HUB_DISABLE_PROGRESS_BARS=0).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (and dataloader workers). Lightning imported only here: a
    fully-cached pipeline rerun never pays its import time."""
    import lightning.pytorch as L

    adopt_library_loggers()  # Lightning's import just added its own stderr handler
    L.seed_everything(seed, workers=True)


def check_required(cfg: DictConfig) -> None:
    """Fail before any heavy work if a `???` value is still missing (STYLE.md principle 7)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    missing = [k for k in missing if not k.startswith("hydra.")]
    if missing:
        raise ConfigError(
            missing[0],
            "required value is missing (`???`); set it on the command line, e.g. "
            + " ".join(f"{k}=..." for k in missing),
        )


def _words(name: str) -> list[str]:
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)  # apiKey -> api_Key
    return [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]


def is_secret_key(key: object) -> bool:
    """True if a config key or dotted override key looks secret: a marker as whole words of one
    segment (`api_key`, `hf_token`, `secret_token`, `logger.wandb.apiKey`), so `tokenizer` and
    `max_new_tokens` are not."""
    for segment in str(key).lstrip("+~").split("."):
        words = _words(segment)
        for marker in SECRET_MARKERS:
            m = marker.split("_")
            if any(words[i : i + len(m)] == m for i in range(len(words) - len(m) + 1)):
                return True
    return False


def redact(obj):
    """Drop values under keys that look secret, so configs and logs never carry W&B keys."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(k) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def redact_overrides(text: str) -> str:
    """`key=value` items in `text` (one argv item, an override, a comma-joined override_dirname)
    with the value of every secret-looking key replaced."""

    def sub(m: re.Match) -> str:
        return f"{m['key']}={REDACTED}" if is_secret_key(m["key"]) else m[0]

    return _OVERRIDE.sub(sub, text)


def redact_all(obj):
    """`redact` plus secret overrides inside strings: for Hydra's own files (.hydra/*.yaml,
    multirun.yaml), which carry the command line as `key=value` strings."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_key(k) else redact_all(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_all(v) for v in obj]
    return redact_overrides(obj) if isinstance(obj, str) else obj


def redact_yaml_file(path: Path) -> bool:
    """Rewrite a YAML file (atomically) with secrets redacted; True if anything changed."""
    node = OmegaConf.load(path)
    data = OmegaConf.to_container(node, resolve=False)
    clean = redact_all(data)
    if clean == data:
        return False
    with atomic_open(path) as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(clean)))
    return True


def resolved_config(cfg: DictConfig) -> dict:
    return redact(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))


def git_sha() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def record_run(cfg: DictConfig, out_dir: Path) -> dict:
    """Write resolved_config.yaml, git_sha.txt and command.txt into the run dir (atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    container = resolved_config(cfg)
    with atomic_open(out_dir / "resolved_config.yaml") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(container)))
    with atomic_open(out_dir / "git_sha.txt") as f:
        f.write(git_sha() + "\n")
    with atomic_open(out_dir / "command.txt") as f:
        f.write(" ".join([sys.executable, *map(redact_overrides, sys.argv)]) + "\n")
    return container
