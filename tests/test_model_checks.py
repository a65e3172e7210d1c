"""model=hf dirs checked before anything is built (issue 14 item 2).

Each broken dir is a good tiny GPT-2 export (config.json, model.safetensors, tokenizer.json)
that the test then breaks. Every case must raise the project's ConfigError naming the dir or file
from the FIRST factory `safealign.fit.build` calls (the tokenizer), with no weights loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from safealign.errors import ConfigError
from safealign.models import build_tiny_gpt2, load_causal_lm, load_tokenizer, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["\n\nHuman: Hello, how are you?\n\nAssistant: Fine, thanks. Keep the soil moist."] * 30


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "model"
    tok = train_bpe_tokenizer(TEXTS, vocab_size=280)
    model = build_tiny_gpt2(tok, n_layer=1, n_head=2, n_embd=16, n_positions=128)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Fail the test if any transformers model reads weights."""
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the dir was checked")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


def _copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "broken"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty_vocab(d: Path) -> None:
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(d / "tokenizer.json"))  # no vocab, no unk: encodes to []


def _unk_only(d: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<|endoftext|>": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))


def _pickle_only(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")


def _missing_shard(d: Path) -> None:
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _assert_names(err: Exception, d: Path, expected: str | tuple[str, ...]) -> None:
    expected = (expected,) if isinstance(expected, str) else expected
    assert all(text in str(err) for text in (str(d), *expected)), str(err)


# (case, how to break the good dir, text(s) the message must contain besides the dir)
BROKEN = [
    ("no config", lambda d: (d / "config.json").unlink(), "no config.json"),
    ("malformed config", lambda d: (d / "config.json").write_text('{\n "a": 1,\n "b": ,\n "c": 2\n}'),
     "config.json:3: malformed JSON"),
    ("config without model_type", lambda d: (d / "config.json").write_text("[]"), "model_type"),
    ("pickle-only weights", _pickle_only, "pytorch_model.bin); safetensors only"),
    ("no weights", lambda d: (d / "model.safetensors").unlink(), "no weights (*.safetensors)"),
    ("truncated safetensors", lambda d: _truncate(d / "model.safetensors"),
     "model.safetensors: unreadable safetensors"),
    ("garbage safetensors", lambda d: (d / "model.safetensors").write_bytes(b"\x05" + b"\0" * 20),
     "model.safetensors: unreadable safetensors"),
    ("missing shard", _missing_shard, "model-00002-of-00002.safetensors"),
    ("no tokenizer files", lambda d: [p.unlink() for p in d.glob("tokenizer*")],
     "no tokenizer files"),
    ("truncated tokenizer.json", lambda d: _truncate(d / "tokenizer.json"),
     ("tokenizer.json:", ": malformed JSON")),
    ("empty vocabulary", _empty_vocab, "to no tokens"),
    ("unknown tokens only", _unk_only, "only unknown tokens"),
]  # fmt: skip


@pytest.mark.parametrize("case, breaks, expected", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_dir_named_before_any_weights(good_dir, tmp_path, no_weights_loaded, case, breaks,
                                             expected):  # fmt: skip
    d = _copy(good_dir, tmp_path)
    breaks(d)
    with pytest.raises(ConfigError, match="model.name_or_path") as err:
        load_tokenizer(str(d))  # fit.build makes the tokenizer first: it must refuse the dir
    _assert_names(err.value, d, expected)


@pytest.mark.parametrize("case, breaks, expected", BROKEN[:8], ids=[c[0] for c in BROKEN[:8]])
def test_causal_lm_loader_checks_the_same_files(good_dir, tmp_path, no_weights_loaded, case,
                                                breaks, expected):  # fmt: skip
    d = _copy(good_dir, tmp_path)
    breaks(d)
    with pytest.raises(ConfigError, match="model.name_or_path") as err:
        load_causal_lm(None, str(d))
    _assert_names(err.value, d, expected)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("some-org/some-model", "set model.lm.local_files_only=false"),
        ("/nowhere/at/all", "model dir /nowhere/at/all does not exist"),
        (None, "required value is missing"),
    ],
)
def test_missing_dir_or_hub_id(no_weights_loaded, name, expected):
    for load in (load_tokenizer, lambda n: load_causal_lm(None, n)):
        with pytest.raises(ConfigError, match="model.name_or_path") as err:
            load(name)
        assert expected in str(err.value)


def test_unreachable_hub_id_is_a_config_error(no_weights_loaded):
    # local_files_only=false: transformers may download, but offline it cannot (HF_HUB_OFFLINE=1).
    with pytest.raises(ConfigError, match="cannot load a tokenizer from some-org/some-model"):
        load_tokenizer("some-org/some-model", local_files_only=False)


def test_a_file_is_not_a_model_dir(good_dir, no_weights_loaded):
    with pytest.raises(ConfigError, match="is a file"):
        load_tokenizer(str(good_dir / "config.json"))


def test_good_dir_loads_and_tokenizer_only_dirs_opt_out(good_dir, tmp_path):
    tok = load_tokenizer(str(good_dir))
    model = load_causal_lm(tok, str(good_dir))
    assert model.get_input_embeddings().num_embeddings == len(tok)
    tok_only = tmp_path / "tok"
    tok.save_pretrained(tok_only)
    with pytest.raises(ConfigError, match="no config.json"):
        load_tokenizer(str(tok_only))
    assert len(load_tokenizer(str(tok_only), require_model=False)) == len(tok)


# --- through the real entry point: exit code 2, the message, nothing built -----------------------


def run_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path}/run",
           f"paths.cache_dir={tmp_path}/cache", f"paths.artifacts_dir={tmp_path}/art",
           "data=builtin_pref", "method=dpo", "trainer=debug", "model=hf", *overrides]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unset", "'model.name_or_path': required value is missing"),
        ("nonexistent", "does not exist"),
        ("no tokenizer files", "no tokenizer files"),  # trained garbage and exited 0 before
    ],
)
def test_cli_refuses_broken_model_dirs(good_dir, tmp_path, case, expected):
    d = tmp_path / "nowhere"
    if case == "no tokenizer files":
        d = _copy(good_dir, tmp_path)
        dict((c[0], c[1]) for c in BROKEN)[case](d)
    r = run_train(tmp_path, *([] if case == "unset" else [f"model.name_or_path={d}"]))
    assert r.returncode == 2, r.stderr[-3000:]
    assert expected in r.stderr and "Traceback" not in r.stderr
    if case != "unset":
        assert str(d) in r.stderr
    assert not (tmp_path / "run" / "model").exists()  # nothing was trained or exported
