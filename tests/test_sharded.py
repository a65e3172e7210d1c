"""Sharded paths on CPU (issue 9 item 7): FSDP2 (2 processes, gloo), raw DeepSpeed ZeRO-3, the
reference under the precision plugin's autocast, LoRA merge, the collective NaN stop."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import pytest
import torch

from safealign.data.collate import PreferenceCollator
from safealign.methods.reference import compute_reference, sharded_reference
from safealign.sharding import full_state_dict, layout, merge_lora, shard_indices

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train.py"


def _env(**extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")  # fmt: skip
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def _zero3_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("zero3_check", ROOT / "scripts" / "zero3_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- fast: pure functions -------------------------------------------------------------------


@pytest.mark.parametrize(("n", "world"), [(10, 2), (7, 2), (5, 3), (1, 2)])
def test_shard_indices_cover_every_row_with_equal_counts(n, world):
    shares = [shard_indices(n, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # same number of batches on every rank
    assert sorted(set().union(*map(set, shares))) == list(range(n))


def test_reference_under_autocast_equals_the_bf16_policy_and_fp32_does_not(tmp_path):
    """The step-0 bias of the old code: the policy runs under bf16 autocast, an fp32 reference
    does not match it; computed under the same forward context it does, exactly."""
    z3 = _zero3_module()
    tok = z3.tokenizer(tmp_path)
    model, rows = z3.build(tok), z3.items(tok)
    collate = PreferenceCollator(tok.pad_token_id)
    loader = torch.utils.data.DataLoader(rows, batch_size=5, collate_fn=collate)
    bf16 = partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    ref_bf16 = compute_reference(model, loader, False, torch.device("cpu"), bf16)
    ref_fp32 = compute_reference(model, loader, False, torch.device("cpu"))
    from safealign.logps import concatenated_forward

    model.eval()
    batch = collate(rows[:5])
    with torch.no_grad(), bf16():
        pol = concatenated_forward(model, *batch.chosen_rejected(), 2)
    torch.testing.assert_close(pol.chosen.float(), ref_bf16["chosen"][:5], atol=1e-4, rtol=0)
    assert (pol.chosen.float() - ref_fp32["chosen"][:5]).abs().max() > 1e-3


def test_sharded_reference_single_process_equals_plain_loop(tmp_path):
    z3 = _zero3_module()
    tok = z3.tokenizer(tmp_path)
    model, rows = z3.build(tok), z3.items(tok)
    collate = PreferenceCollator(tok.pad_token_id)
    got = sharded_reference(model, rows, collate, 3, False, torch.device("cpu"))
    loader = torch.utils.data.DataLoader(rows, batch_size=3, collate_fn=collate)
    want = compute_reference(model, loader, False, torch.device("cpu"))
    assert set(got) == {"chosen", "rejected", "toxic"}
    for k in got:
        torch.testing.assert_close(got[k], want[k][want["index"].argsort()])


def test_lora_merge_from_state_dict_matches_peft_merge_and_unload(tmp_path):
    from peft import LoraConfig, get_peft_model

    z3 = _zero3_module()
    tok = z3.tokenizer(tmp_path)
    base = z3.build(tok)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                     fan_in_fan_out=True)  # fmt: skip
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # B starts at zero: make the adapter non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    state = full_state_dict(model)
    merged = merge_lora(state, model.peft_config["default"])
    want = model.merge_and_unload().state_dict()
    assert set(merged) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=0, msg=k)


def test_nan_on_another_rank_stops_this_rank_too():
    from safealign.errors import NonFiniteLossError
    from safealign.methods.base import BaseModule

    class Strategy:
        def reduce_boolean_decision(self, decision, all=True):  # noqa: A002 - Lightning's name
            return True  # some other rank saw a NaN

    class Trainer:
        world_size, strategy, global_step, current_epoch = 2, Strategy(), 7, 0

    module = BaseModule(lambda tok: torch.nn.Linear(1, 1), None, None)
    module._trainer = Trainer()
    with pytest.raises(NonFiniteLossError, match="another rank at global step 7"):
        module.check_finite(torch.tensor(1.0), torch.tensor([3]), 0)


# --- slow: real multi-process runs ------------------------------------------------------------


def _fsdp2_args(tmp: Path, procs: int) -> list[str]:
    # Global batch 8 either way (1 x 8 or 2 x 4); both use strategy=fsdp2, so both get Lightning's
    # DistributedSampler over the same seeded permutation: step k sees the same 8 rows. SGD, so a
    # wrong gradient reduction would show (Adam's step is scale-invariant).
    bs = str(8 // procs)
    return ["experiment=dpo_builtin", "eval=none", "strategy=fsdp2", f"trainer.devices={procs}",
            "data.source.size=96", "init.data.source.size=96", f"data.batch_size={bs}",
            f"init.data.batch_size={bs}", "trainer.max_steps=3", "+init.trainer.max_steps=3",
            "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
            "method.optimizer._target_=torch.optim.SGD", "method.optimizer.lr=1.0",
            "init.method.optimizer._target_=torch.optim.SGD", "init.method.optimizer.lr=1.0",
            "model.lm.n_embd=32", "model.lm.n_head=2", "model.tokenizer.vocab_size=300",
            "trainer.enable_progress_bar=false", "logger=csv",
            f"paths.cache_dir={tmp / f'cache{procs}'}", f"paths.artifacts_dir={tmp / f'art{procs}'}",
            f"hydra.run.dir={tmp / f'dpo{procs}'}"]  # fmt: skip


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp2")
    procs = {}
    for n in (1, 2):
        with open(tmp / f"run{n}.log", "w") as log:
            procs[n] = subprocess.Popen([sys.executable, str(TRAIN), *_fsdp2_args(tmp, n)],
                                        cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    for n, p in procs.items():
        p.wait(timeout=900)  # nothing may hang: a deadlock fails here instead of blocking CI
        assert p.returncode == 0, (tmp / f"run{n}.log").read_text()[-4000:]
    return tmp


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


@pytest.mark.slow
def test_fsdp2_two_processes_sft_export_dpo_export_matches_one_process(fsdp2_runs: Path):
    from transformers import AutoModelForCausalLM

    for stage in ("sft", "dpo"):
        if stage == "sft":
            one, two = (next((fsdp2_runs / f"art{n}" / "sft").glob("*/model")) for n in (1, 2))
        else:
            one, two = (fsdp2_runs / f"dpo{n}" / "model" for n in (1, 2))
        w1, w2 = _weights(one), _weights(two)
        assert set(w1) == set(w2)
        for k in w1:  # full shapes, gathered; measured max |diff| ~1e-7 (weights are O(1))
            assert w2[k].shape == w1[k].shape and w2[k].numel() > 0, k
            torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0, msg=f"{stage} {k}")
        model = AutoModelForCausalLM.from_pretrained(two, local_files_only=True)
        assert sum(p.numel() for p in model.parameters()) > 0
    for n in (1, 2):  # step 0: policy == cached reference, computed after sharding
        first = _history(fsdp2_runs / f"dpo{n}")[0]
        assert abs(first["train/kl/chosen_step"]) < 1e-5 and abs(first["train/kl/rejected_step"]) < 1e-5


@pytest.mark.slow
def test_bf16_mixed_step0_kl_is_zero(tmp_path):
    args = ["experiment=dpo_builtin", "eval=none", "trainer.precision=bf16-mixed",
            "data.source.size=96",
            "init.data.source.size=96", "data.batch_size=4", "init.data.batch_size=4",
            "trainer.max_steps=1", "+init.trainer.max_steps=2", "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1", "model.lm.n_embd=32", "model.lm.n_head=2",
            "model.tokenizer.vocab_size=300", "trainer.enable_progress_bar=false", "logger=csv",
            f"paths.cache_dir={tmp_path / 'cache'}", f"paths.artifacts_dir={tmp_path / 'art'}",
            f"hydra.run.dir={tmp_path / 'dpo'}"]  # fmt: skip
    res = subprocess.run([sys.executable, str(TRAIN), *args], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    first = _history(tmp_path / "dpo")[0]
    # measured: exactly 0.0 (the old fp32 reference gave |KL| ~1e-2 against the bf16 policy)
    assert abs(first["train/kl/chosen_step"]) < 1e-3 and abs(first["train/kl/rejected_step"]) < 1e-3


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero3")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "scripts" / "zero3_check.py"), "--out-dir", str(out)]  # fmt: skip
    env = _env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


@pytest.mark.slow
def test_zero3_reference_and_export_equal_the_unsharded_model(zero3_run: Path):
    z3 = _zero3_module()
    got = json.loads((zero3_run / "zero3.json").read_text())
    assert got["layout"] == "zero3" and got["world_size"] == 2
    assert sum(got["local_numel"].values()) == 0  # really partitioned: no full tensor anywhere
    tok = z3.tokenizer(zero3_run / "cache")
    # An unsharded copy of the engine's weights, gathered independently parameter by parameter
    # (a config-built model initialises differently under zero.Init: HF's init runs on empty
    # shards, so "build the same model again" is not the reference).
    gathered = _weights_file(zero3_run / "gathered.safetensors")
    model = z3.build(tok)
    missing, unexpected = model.load_state_dict(gathered, strict=False)
    assert not unexpected and missing == ["lm_head.weight"], missing  # tied to wte
    assert layout(model) == "plain"
    want = sharded_reference(model, z3.items(tok), PreferenceCollator(tok.pad_token_id), 3, False,
                             torch.device("cpu"), nullcontext)  # fmt: skip
    for k, v in want.items():  # measured: equal to ~1e-6 (summed log-probs of ~-100)
        torch.testing.assert_close(torch.tensor(got["reference"][k]), v, atol=1e-4, rtol=1e-6)
    exported = _weights(zero3_run / "export")
    reloaded = _weights_file(zero3_run / "reloaded.safetensors")  # from_pretrained in zero.Init
    for k, v in gathered.items():
        assert v.numel() > 0, k
        torch.testing.assert_close(reloaded[k], v, atol=0, rtol=0, msg=f"reloaded {k}")
        if k in exported:  # the tied lm_head is written once, as transformers does
            torch.testing.assert_close(exported[k], v, atol=0, rtol=0, msg=f"export {k}")
    assert "transformer.wte.weight" in exported and len(exported) >= len(gathered) - 1


def _weights_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


@pytest.fixture(scope="module")
def lora_runs(fsdp2_runs: Path) -> tuple[Path, Path]:
    """LoRA DPO on the FSDP2 SFT export, 1 and 2 processes (global batch 8 both)."""
    base = next((fsdp2_runs / "art1" / "sft").glob("*/model"))
    procs = {}
    for n in (1, 2):
        args = ["method=dpo", "data=builtin_pref", "model=hf", f"model.name_or_path={base}",
                "model.lm.lora={r:4,lora_alpha:8,target_modules:[c_attn],fan_in_fan_out:true}",
                "strategy=fsdp2", f"trainer.devices={n}", "data.source.size=96",
                f"data.batch_size={8 // n}", "trainer.max_steps=3", "trainer.limit_val_batches=1",
                "method.optimizer.lr=0.01", "trainer.enable_progress_bar=false", "logger=csv",
                f"paths.cache_dir={fsdp2_runs / f'lcache{n}'}",
                f"paths.artifacts_dir={fsdp2_runs / f'lart{n}'}",
                f"hydra.run.dir={fsdp2_runs / f'lora{n}'}"]  # fmt: skip
        with open(fsdp2_runs / f"lora{n}.log", "w") as log:
            procs[n] = subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=ROOT, env=_env(),
                                        stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    for n, p in procs.items():
        p.wait(timeout=900)
        assert p.returncode == 0, (fsdp2_runs / f"lora{n}.log").read_text()[-4000:]
    return base, fsdp2_runs


@pytest.mark.slow
def test_fsdp2_lora_export_is_merged_full_and_equal_across_process_counts(lora_runs):
    base, runs = lora_runs
    w0 = _weights(base)
    w1, w2 = (_weights(runs / f"lora{n}" / "model") for n in (1, 2))
    assert set(w1) == set(w2) == set(w0)  # base model names: merged, no adapter keys
    for k, v in w0.items():
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0, msg=k)
        if ".attn.c_attn.weight" in k:  # the adapter was trained and merged into the base
            assert (w2[k] - v).abs().max() > 1e-5, k
        else:  # everything else was frozen
            torch.testing.assert_close(w2[k], v, atol=0, rtol=0, msg=k)
    first = _history(runs / "lora2")[0]
    assert abs(first["train/kl/chosen_step"]) < 1e-5
