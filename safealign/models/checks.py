"""Model-dir checks run before anything is built (issue 14 item 2).

Each problem a local `model.name_or_path` can have (missing dir, no or malformed `config.json`,
pickle-only or truncated weights, no tokenizer files, a tokenizer that encodes text to nothing)
becomes one `ConfigError` naming the dir or file and what to do, instead of a transformers
traceback after minutes of loading, or worse, an empty tokenizer that trains garbage and exits 0.
Everything here reads headers and small JSON files only: no weights are loaded. A hub id
(`ORG/NAME`) is checked in its cached snapshot dir (issue 10 item 1), so runs stay offline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safealign.errors import ConfigError

KEY = "model.name_or_path"
LOCAL_ONLY_KEY = "model.lm.local_files_only"
PROBE = "Hello, how are you?"
# Any one of these lets AutoTokenizer build a tokenizer (tokenizer_config.json alone: byte-level
# ones like ByT5); whether it has a real vocabulary is what the probe checks.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# "org/name" or "name": roughly what huggingface_hub accepts as a repo id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith(".")


def cached_snapshot_dir(repo_id: str) -> Path | None:
    """The snapshot dir of `repo_id` in the local HF cache (`refs/main`), or None when not cached.

    Reads the cache only (never the network): the same resolution `from_pretrained` does with
    `local_files_only=True`, so the checks below look at the files transformers will load."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None


def hub_cache_dir() -> str:
    """The hub cache read at call time (HF_HUB_CACHE / HF_HOME), as huggingface_hub does."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def local_model_dir(name_or_path: str | None, local_files_only: bool = True) -> Path | None:
    """The local dir behind `name_or_path`: the path itself, or a hub id's cached snapshot.

    None for a hub id transformers may download (`local_files_only=False`, not a local dir).
    Raises ConfigError for an unset value, a path that is a file, and a missing path or uncached
    hub id under `local_files_only` (naming the key to set and the cache dir checked)."""
    if name_or_path is None or str(name_or_path).strip() in ("", "???"):
        raise ConfigError(KEY, "required value is missing; set model.name_or_path=<model dir>")
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(KEY, f"{path} is a file; expected a model directory")
    if not local_files_only:
        return None  # the hub decides (newer revisions included); transformers reports errors
    snapshot = cached_snapshot_dir(name) if _looks_like_hub_id(name) else None
    if snapshot is not None:
        return snapshot
    hint = ""
    if _looks_like_hub_id(name):
        hint = (
            f"; {name!r} looks like a hub id, but it is not in the local HF cache "
            f"{hub_cache_dir()} (HF_HUB_CACHE / HF_HOME) and only local files are read: set "
            f"{LOCAL_ONLY_KEY}=false on a machine that reaches the hub, download it there first "
            f"(hf download {name}), or point {KEY} at a local model dir"
        )
    raise ConfigError(KEY, f"model dir {path.resolve()} does not exist{hint}")


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(
            KEY, f"{path}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno})"
        ) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(KEY, f"{path}: unreadable ({err})") from err


def check_config(model_dir: Path) -> None:
    """`config.json` exists, parses, and names its architecture (`model_type`)."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(
            KEY, f"{model_dir} has no config.json; expected a saved model (save_pretrained)"
        )
    config = _read_json(path)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ConfigError(KEY, f"{path}: expected a JSON object with a 'model_type' string")


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(model_dir.glob("*.safetensors"))
    weight_map = _read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConfigError(KEY, f"{index}: expected a non-empty 'weight_map' object")
    shards = [model_dir / name for name in sorted(set(map(str, weight_map.values())))]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise ConfigError(KEY, f"{index} lists shards missing from {model_dir}: {missing}")
    return shards


def check_weights(model_dir: Path) -> None:
    """Safetensors weights present and each file's header readable (a truncated or corrupt file
    fails here: safetensors checks the header covers the whole file). Reads headers only."""
    from safetensors import SafetensorError, safe_open

    files = _safetensors_files(model_dir)
    if not files:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not pickles:
            raise ConfigError(KEY, f"{model_dir} has no weights (*.safetensors)")
        raise ConfigError(
            KEY,
            f"{model_dir} has only pickle weights ({', '.join(pickles)}); safetensors only "
            "(unpickling can run code). Convert a checkpoint you trust with: python -c "
            '"from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained('{model_dir}').save_pretrained('{model_dir}')\"",
        )
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as err:
            raise ConfigError(
                KEY,
                f"{path}: unreadable safetensors ({err}); truncated or corrupt, export it again",
            ) from err


def check_tokenizer_files(model_dir: Path) -> None:
    """A tokenizer file is present and the JSON ones parse."""
    present = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if not present:
        raise ConfigError(
            KEY,
            f"{model_dir} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save "
            "the tokenizer beside the model (tokenizer.save_pretrained)",
        )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (model_dir / name).is_file():
            _read_json(model_dir / name)


def check_model_dir(model_dir: Path, tokenizer: bool = True) -> None:
    """All file-level checks of a local model dir: config, weights and (optionally) tokenizer."""
    check_config(model_dir)
    check_weights(model_dir)
    if tokenizer:
        check_tokenizer_files(model_dir)


def _unknown_ids(tokenizer) -> set[int]:
    # The backend model's own unk token counts too: tokenizer_config.json may not declare it.
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    tokens = {tokenizer.unk_token, getattr(model, "unk_token", None)} - {None}
    ids = {tokenizer.convert_tokens_to_ids(t) for t in tokens} | {getattr(model, "unk_id", None)}
    return ids - {None}


def check_probe(tokenizer, source: object) -> None:
    """A loaded tokenizer must encode :data:`PROBE` to some known token: an empty vocabulary
    encodes every text to nothing, so training would see empty sequences (loss 0.0) and exit 0."""
    ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    if not ids or set(ids) <= _unknown_ids(tokenizer):
        what = "no tokens" if not ids else f"only unknown tokens {ids}"
        raise ConfigError(
            KEY,
            f"the tokenizer from {source} encodes {PROBE!r} to {what} "
            f"(vocabulary of {len(tokenizer)}): its files are empty or broken",
        )
