"""Llama-family architectures end to end through `model=hf` (issue 10 item 4).

Tiny random Llama, Qwen2, Mistral and GPT-NeoX models, built from transformers configs and saved
with `save_pretrained` beside a BPE tokenizer trained on the built-in corpus (never downloaded),
run SFT -> DPO -> ADPO -> ISAAC -> evaluate with LoRA, gradient checkpointing and bf16-mixed on
CPU. The four chains run stage by stage, their subprocesses side by side (one module fixture);
each architecture's test then checks its own chain.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# LoRA targets per architecture: GPT-NeoX fuses q, k and v into one projection.
ARCHS = {
    "llama": ("LlamaConfig", ["q_proj", "v_proj"]),
    "qwen2": ("Qwen2Config", ["q_proj", "v_proj"]),
    "mistral": ("MistralConfig", ["q_proj", "v_proj"]),
    "gpt_neox": ("GPTNeoXConfig", ["query_key_value"]),
}
SMALL = ["data.source.size=100", "data.batch_size=4", "trainer.limit_val_batches=1",
         "trainer.enable_progress_bar=false", "trainer.precision=bf16-mixed",
         "model.lm.gradient_checkpointing=true"]  # fmt: skip
STEPS = ["trainer.max_steps=2"]
# ISAAC: a small corpus needs a small neighbourhood (K <= contexts); 2 tempering stages.
ISAAC = ["data.source.size=200", "data.k=20", "data.encoder.dim=32", "trainer.max_epochs=2",
         "trainer.limit_train_batches=2"]  # fmt: skip


def _save_model(arch: str, tok, out: Path) -> None:
    import transformers

    config_cls = getattr(transformers, ARCHS[arch][0])
    config = config_cls(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **({} if arch == "gpt_neox" else {"num_key_value_heads": 2}),  # GQA where it exists
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _run(script: str, run_dir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")  # fmt: skip
    cmd = [sys.executable, script, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}",
           f"paths.artifacts_dir={cache}/art", *overrides]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _train_args(arch: str, model_dir: Path) -> list[str]:
    targets = ",".join(ARCHS[arch][1])
    lora = f"model.lm.lora={{r:4,lora_alpha:8,target_modules:[{targets}]}}"
    return ["model=hf", f"model.name_or_path={model_dir}", lora, *SMALL, "eval=none"]


Jobs = dict[tuple[str, str], tuple]  # (arch, stage) -> _run's arguments
METHODS = ("dpo", "adpo", "isaac")


def _stage(jobs: Jobs) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {key: pool.submit(_run, *args) for key, args in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


def _sft_job(root: Path, arch: str) -> tuple:
    d = root / arch
    return ("train.py", d / "sft", d / "cache", "experiment=sft_builtin",
            *_train_args(arch, d / "base"), *STEPS)  # fmt: skip


def _method_job(root: Path, arch: str, method: str) -> tuple:
    """DPO/ADPO without their init stage, ISAAC as is: each starts from the SFT export."""
    d = root / arch
    extra = ISAAC if method == "isaac" else ["~init", *STEPS]
    return ("train.py", d / method, d / "cache", f"experiment={method}_builtin",
            *_train_args(arch, d / "sft" / "model"), *extra)  # fmt: skip


def _eval_job(root: Path, arch: str) -> tuple:
    d = root / arch
    models = [f"models.{m}={d / m}" for m in ("sft", *METHODS)]
    return ("evaluate.py", d / "evaluate", d / "cache", *models, "max_prompts=3",
            "generation.max_new_tokens=8", "progress=false")  # fmt: skip


@pytest.fixture(scope="module")
def chains(tmp_path_factory) -> tuple[Path, dict[tuple[str, str], subprocess.CompletedProcess]]:
    """Every architecture's chain; a stage whose input failed is not run (absent from results)."""
    from safealign.data.builtin import generate_builtin
    from safealign.models import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("archs")
    corpus = generate_builtin(size=200, seed=0)
    tok = train_bpe_tokenizer([t for r in corpus.train for t in (r.context, r.response)], 300)
    for arch in ARCHS:
        _save_model(arch, tok, root / arch / "base")
    out = _stage({(a, "sft"): _sft_job(root, a) for a in ARCHS})
    ok = [a for a in ARCHS if out[(a, "sft")].returncode == 0]
    out |= _stage({(a, m): _method_job(root, a, m) for a in ok for m in METHODS})
    done = [a for a in ok if all(out[(a, m)].returncode == 0 for m in METHODS)]
    out |= _stage({(a, "evaluate"): _eval_job(root, a) for a in done})
    return root, out


def _changed_tensors(before: Path, after: Path) -> set[str]:
    from safetensors.torch import load_file

    a, b = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_chain_runs_end_to_end(chains, arch):
    from safealign.models import load_causal_lm, load_tokenizer

    root, out = chains
    for stage in ("sft", *METHODS, "evaluate"):
        assert (arch, stage) in out, f"{stage} not run: an earlier stage failed"
        r = out[(arch, stage)]
        assert r.returncode == 0, f"{arch} {stage}:\n{r.stderr[-4000:]}"
    for stage in ("sft", *METHODS):  # exported (LoRA merged) and loadable
        model_dir = root / arch / stage / "model"
        model = load_causal_lm(load_tokenizer(str(model_dir)), str(model_dir))
        assert model.config.model_type == arch
    # LoRA trained only its targets: the merged SFT export differs from the base there alone.
    changed = _changed_tensors(root / arch / "base", root / arch / "sft" / "model")
    assert changed and all(any(t in k for t in ARCHS[arch][1]) for k in changed), changed
    history = (root / arch / "dpo" / "history.jsonl").read_text().splitlines()
    kl = [row["train/kl/chosen_step"] for row in map(json.loads, history)
          if "train/kl/chosen_step" in row]  # fmt: skip
    assert kl and abs(kl[0]) < 1e-2, kl  # the reference is the policy at step 0
    rows = json.loads((root / arch / "evaluate" / "table.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["sft", "dpo", "adpo", "isaac"]
    assert all(r["n_prompts"] == 3 and r["toxicity_rate"] is not None for r in rows)
    assert (root / arch / "evaluate" / "table.md").is_file()
