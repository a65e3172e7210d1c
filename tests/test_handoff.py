"""Model settings survive stage hand-offs (issue 9 item 4): between the SFT init stage and the
preference stage only the weights path changes; LoRA, dtype, attention implementation and
gradient checkpointing carry over. Gradient checkpointing changes memory, never the maths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import safealign.fit
import safealign.run
from safealign.errors import ConfigError
from safealign.models import build_tiny_gpt2, load_causal_lm, load_tokenizer, train_bpe_tokenizer
from safealign.pipeline.stages import hf_model_config

TEXTS = ["\n\nHuman: how do I water a fern?\n\nAssistant: Keep the soil moist, not wet."] * 30
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}
PLAIN = ["trainer.enable_progress_bar=false", "logger=csv"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 built from config with transformers and saved like a hub checkpoint."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2")
    tok = train_bpe_tokenizer(TEXTS, vocab_size=300)
    config = GPT2Config(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=32, n_positions=256,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


# --- the config rule ---------------------------------------------------------------------------


def test_hf_group_is_kept_whole_with_only_the_path_changed(make_cfg, hf_dir):
    cfg = make_cfg("model=hf", f"model.name_or_path={hf_dir}", "model.lm.dtype=bfloat16",
                   "model.lm.lora={r:4,lora_alpha:8,target_modules:[c_attn]}",
                   "+model.tokenizer.use_fast=true", tiny=False)  # fmt: skip
    out = hf_model_config(Path("/art/sft/abc/model"), cfg.model)
    want = OmegaConf.to_container(cfg.model, resolve=True)
    for node in (want, want["lm"], want["tokenizer"]):
        node["name_or_path"] = "/art/sft/abc/model"
    assert OmegaConf.to_container(out, resolve=True) == want


def test_built_from_config_switches_to_the_loader_and_carries_settings(make_cfg):
    cfg = make_cfg("model.lm.gradient_checkpointing=true", "model.lm.attn_implementation=eager",
                   "+model.lm.dtype=bfloat16")  # fmt: skip
    out = OmegaConf.to_container(hf_model_config(Path("/m"), cfg.model), resolve=True)
    assert out["lm"] == {
        "_target_": "safealign.models.load_causal_lm", "_partial_": True, "name_or_path": "/m",
        "dtype": "bfloat16", "attn_implementation": "eager", "gradient_checkpointing": True,
        "local_files_only": True,
    }  # fmt: skip
    assert out["tokenizer"]["_target_"] == "safealign.models.load_tokenizer"
    assert out["tokenizer"]["name_or_path"] == "/m"


def test_bad_memory_options_are_config_errors_naming_the_key():
    tok = train_bpe_tokenizer(TEXTS, vocab_size=280)
    with pytest.raises(ConfigError, match="model.lm.gradient_checkpointing"):
        build_tiny_gpt2(tok, gradient_checkpointing="yes")
    with pytest.raises(ConfigError, match="model.lm.attn_implementation.*flash_attn"):
        build_tiny_gpt2(tok, attn_implementation="flash_attn")
    model = build_tiny_gpt2(tok, n_embd=16, n_head=2, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


# --- gradient checkpointing: same loss and gradients ---------------------------------------------


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict]:
    model.train()
    torch.manual_seed(1)  # the same dropout masks; non-reentrant checkpointing replays the RNG
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def test_checkpointed_tiny_model_has_the_same_loss_and_gradients():
    tok = train_bpe_tokenizer(TEXTS, vocab_size=280)
    kw = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "dropout": 0.1, "seed": 3}
    plain, ckpt = (
        build_tiny_gpt2(tok, **kw),
        build_tiny_gpt2(tok, gradient_checkpointing=True, **kw),
    )
    assert ckpt.transformer.gradient_checkpointing and not ckpt.config.use_cache
    ids = torch.randint(0, len(tok), (3, 24), generator=torch.Generator().manual_seed(0))
    (l0, g0), (l1, g1) = _loss_and_grads(plain, ids), _loss_and_grads(ckpt, ids)
    assert l1 == pytest.approx(l0, abs=1e-6) and g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=0, msg=n)


def test_checkpointed_lora_model_has_the_same_adapter_gradients(hf_dir):
    tok = load_tokenizer(str(hf_dir))
    ids = torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(0))
    runs = []
    for gc in (False, True):
        torch.manual_seed(0)  # LoRA A is drawn from the global RNG
        runs.append(
            _loss_and_grads(
                load_causal_lm(tok, str(hf_dir), lora=LORA, gradient_checkpointing=gc), ids
            )
        )
    (l0, g0), (l1, g1) = runs
    assert l1 == pytest.approx(l0, abs=1e-6) and g0 and g0.keys() == g1.keys()
    assert all("lora_" in n for n in g0) and any(g.abs().sum() > 0 for g in g0.values())
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=0, msg=n)


# --- end to end: SFT init stage -> DPO ----------------------------------------------------------


@pytest.fixture
def built(monkeypatch) -> list:
    """(cfg, module) of every `fit.build` call: the SFT stage's, then the DPO run's."""
    calls, real = [], safealign.fit.build

    def spy(cfg):
        out = real(cfg)
        calls.append((cfg, out[2]))
        return out

    monkeypatch.setattr(safealign.fit, "build", spy)
    return calls


def _run(make_cfg, *overrides: str):
    cfg = make_cfg("experiment=dpo_builtin", "trainer=debug", "data.source.size=200", "eval=none",
                   "init.data.source.size=200", "+init.trainer.fast_dev_run=true",
                   *overrides, tiny=False)  # fmt: skip
    safealign.run.train(cfg)
    return cfg


def test_lora_and_settings_survive_the_sft_to_dpo_hand_off(make_cfg, hf_dir, built):
    from peft import PeftModel

    cfg = _run(make_cfg, *PLAIN, "model=hf", f"model.name_or_path={hf_dir}",
               "model.lm.lora={r:4,lora_alpha:8,target_modules:[c_attn]}",
               "model.lm.gradient_checkpointing=true", "model.lm.attn_implementation=eager")  # fmt: skip
    assert len(built) == 2
    (sft_cfg, sft), (dpo_cfg, dpo) = built
    sft_dir = Path(dpo_cfg.model.lm.name_or_path)
    assert sft_dir.name == "model" and sft_dir.parent.parent.name == "sft"  # the stage's export
    assert dpo_cfg.model.tokenizer.name_or_path == dpo_cfg.model.name_or_path == str(sft_dir)
    for module in (sft, dpo):
        assert isinstance(module.model, PeftModel)  # not silently a full fine-tune
        lora = module.model.peft_config["default"]
        assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (4, 8, {"c_attn"})
        base = module.model.get_base_model()
        assert base.transformer.gradient_checkpointing and not base.config.use_cache
        assert base.config._attn_implementation == "eager"
    assert dpo_cfg.model.lm.dtype == "float32" and dpo_cfg.model.lm.local_files_only
    assert (Path(cfg.paths.output_dir) / "model" / "model.safetensors").exists()


def test_settings_of_a_model_built_from_config_survive(make_cfg, built):
    _run(make_cfg, *PLAIN, "model.lm.n_embd=32", "model.lm.n_head=2",
         "model.tokenizer.vocab_size=300", "model.lm.gradient_checkpointing=true")  # fmt: skip
    (_, sft), (dpo_cfg, dpo) = built
    assert dpo_cfg.model.lm._target_ == "safealign.models.load_causal_lm"
    for module in (sft, dpo):
        assert module.model.transformer.gradient_checkpointing and not module.model.config.use_cache
    assert dpo.model.config.n_embd == 32  # the SFT stage's architecture, loaded from its export
