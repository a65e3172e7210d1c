"""`model=hf model.name_or_path=ORG/NAME` from the local HF cache, offline (issue 10 item 1).

The cache is faked under tmp exactly as huggingface_hub lays it out: content-addressed files in
`blobs/`, a `snapshots/<sha>/` tree of symlinks to them and `refs/main` naming the sha. Nothing is
downloaded: HF_HUB_OFFLINE=1 (conftest) and `local_files_only` stays true unless a test says so.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from safealign.errors import ConfigError
from safealign.models import build_tiny_gpt2, load_causal_lm, load_tokenizer, train_bpe_tokenizer
from safealign.models.checks import LOCAL_ONLY_KEY

ROOT = Path(__file__).resolve().parents[1]
REPO = "tiny-org/tiny-gpt2"
SHA = "0123456789abcdef0123456789abcdef01234567"
TEXTS = ["\n\nHuman: how do I water a fern?\n\nAssistant: Keep the soil moist."] * 30


def _cache_repo(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """Put `model_dir`'s files into `cache` as the hub does; returns the snapshot dir."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SHA
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(model_dir.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    return snapshot


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    out = tmp_path_factory.mktemp("model")
    tok = train_bpe_tokenizer(TEXTS, vocab_size=280)
    model = build_tiny_gpt2(tok, n_layer=1, n_head=2, n_embd=16, n_positions=128)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out, model.eval()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, saved) -> Path:
    """A fake hub cache holding REPO, pointed at by the env and by huggingface_hub's constant
    (read once at import; transformers and snapshot_download read the constant at call time)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    _cache_repo(cache, REPO, saved[0])
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_cached_hub_id_loads_offline_through_model_hf(hub_cache, saved, make_cfg):
    cfg = make_cfg("model=hf", f"model.name_or_path={REPO}", tiny=False)
    assert cfg.model.lm.local_files_only is True  # the default: runs stay offline
    tok = instantiate(cfg.model.tokenizer)(texts=None)
    model = instantiate(cfg.model.lm)(tok)
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(model(ids).logits, saved[1](ids).logits)
    snapshot = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / SHA
    assert Path(model.config._name_or_path) == snapshot  # the snapshot the checks looked at


def test_uncached_hub_id_names_the_key_and_the_cache(hub_cache, saved):
    tok = load_tokenizer(REPO)
    for load in (load_tokenizer, lambda name: load_causal_lm(tok, name)):
        with pytest.raises(ConfigError, match="model.name_or_path") as err:
            load("tiny-org/not-cached")
        assert f"set {LOCAL_ONLY_KEY}=false" in str(err.value)
        assert str(hub_cache) in str(err.value)


def test_cached_snapshot_is_checked_like_a_local_dir(hub_cache, saved):
    snapshot = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / SHA
    (snapshot / "model.safetensors").unlink()  # a partial download: config and tokenizer only
    with pytest.raises(ConfigError, match="has no weights") as err:
        load_causal_lm(load_tokenizer(REPO, require_model=False), REPO)
    assert str(snapshot) in str(err.value)


def test_local_files_only_false_is_passed_through(monkeypatch, saved):
    """With the hub allowed, an uncached id goes to transformers as is (it may download)."""
    from transformers import AutoModelForCausalLM

    seen = {}

    def fake(name, **kwargs):
        seen.update(kwargs, name=name)
        return saved[1]

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    load_causal_lm(load_tokenizer(str(saved[0])), "tiny-org/not-cached", local_files_only=False)
    assert seen["name"] == "tiny-org/not-cached" and seen["local_files_only"] is False
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True


def _train(tmp_path: Path, cache: Path, name: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", HF_HUB_CACHE=str(cache))
    cmd = [sys.executable, "train.py", f"hydra.run.dir={tmp_path}/run",
           f"paths.cache_dir={tmp_path}/cache", f"paths.artifacts_dir={tmp_path}/art",
           "data=builtin_pref", "data.source.size=100", "method=dpo", "trainer=debug",
           "model=hf", f"model.name_or_path={name}"]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_trains_from_a_cached_hub_id(hub_cache, tmp_path):
    r = _train(tmp_path, hub_cache, REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    r = _train(tmp_path / "uncached", hub_cache, "tiny-org/not-cached")
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"set {LOCAL_ONLY_KEY}=false" in r.stderr and str(hub_cache) in r.stderr
    assert "Traceback" not in r.stderr
