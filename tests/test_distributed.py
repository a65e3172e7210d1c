"""Strategies: config composition, the generated DeepSpeed config, 2-process DDP (gloo) parity
with one process, and raw DeepSpeed ZeRO-2/3 on 2 CPU processes (ENV.md "Distributed on CPU")."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from safealign.distributed import deepspeed_config, module_classes, starts_script_subprocesses
from safealign.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TRAIN = Path(os.environ.get("SAFEALIGN_TRAIN_PY", ROOT / "train.py"))
DEEPSPEED = {"deepspeed": (2, False), "deepspeed_z2": (2, False), "deepspeed_z3": (3, False),
             "deepspeed_z2_offload": (2, True), "deepspeed_z3_offload": (3, True)}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_deepspeed_config_sections():
    z2 = deepspeed_config(stage=2)
    assert z2["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in z2["zero_optimization"]
    assert "bf16" not in z2 and "fp16" not in z2 and "train_micro_batch_size_per_gpu" not in z2
    z3 = deepspeed_config(stage=3, offload=True, precision="bf16-mixed")["zero_optimization"]
    assert z3["offload_param"]["device"] == "cpu" and z3["offload_optimizer"]["device"] == "cpu"
    assert z3["stage3_gather_16bit_weights_on_model_save"] is True
    assert "offload_param" not in deepspeed_config(stage=2, offload=True)["zero_optimization"]
    assert deepspeed_config(precision="bf16-mixed")["bf16"] == {"enabled": True}
    assert deepspeed_config(precision="16-mixed")["fp16"]["loss_scale"] == 0  # dynamic (V100)
    raw = deepspeed_config(micro_batch_size=4, grad_accum=2, gradient_clipping=1.0)
    assert (raw["train_micro_batch_size_per_gpu"], raw["gradient_accumulation_steps"]) == (4, 2)
    with pytest.raises(ConfigError, match="stage"):
        deepspeed_config(stage=4)
    with pytest.raises(ConfigError, match="precision"):
        deepspeed_config(precision="fp8")


@pytest.mark.parametrize("option", sorted(DEEPSPEED))
def test_deepspeed_strategy_options_use_the_generated_config(option: str):
    stage, offload = DEEPSPEED[option]
    trainers = (("cpu", "32-true"), ("gpu", "bf16-mixed"), ("gpu_v100", "16-mixed"))
    for trainer, precision in trainers if option == "deepspeed_z3" else trainers[:1]:
        cfg = _compose(f"strategy={option}", f"trainer={trainer}")
        assert cfg.trainer.precision == precision
        node = cfg.trainer.strategy
        # Lightning's, plus transformers told about ZeRO-3 while the model is built (strategies.py)
        assert node._target_ == "safealign.strategies.DeepSpeedStrategy"
        assert instantiate(node.config) == deepspeed_config(stage, offload, precision)
    # offloaded optimizer states want DeepSpeed's CPU Adam; the others keep the method's AdamW
    want = "deepspeed.ops.adam.DeepSpeedCPUAdam" if offload else "torch.optim.AdamW"
    assert cfg.method.optimizer._target_ == want


def test_ddp_and_fsdp_options_instantiate():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    ddp = instantiate(_compose("strategy=ddp").trainer.strategy)
    spawn = instantiate(_compose("strategy=ddp_spawn").trainer.strategy)
    assert isinstance(ddp, DDPStrategy) and ddp._start_method == "popen"
    assert isinstance(spawn, DDPStrategy) and spawn._start_method == "spawn"
    fsdp_cfg = _compose("strategy=fsdp").trainer.strategy
    assert GPT2Block in instantiate(fsdp_cfg.auto_wrap_policy)
    assert isinstance(instantiate(fsdp_cfg), FSDPStrategy)
    with pytest.raises(ConfigError, match="NoSuchBlock"):
        module_classes(["transformers.models.gpt2.modeling_gpt2.NoSuchBlock"])
    from safealign.strategies import DeepSpeedStrategy, FSDP2Strategy

    fsdp2 = instantiate(_compose("strategy=fsdp2").trainer.strategy)
    assert isinstance(fsdp2, FSDP2Strategy) and GPT2Block in fsdp2.wrap_classes
    z3 = instantiate(_compose("strategy=deepspeed_z3").trainer.strategy)
    assert isinstance(z3, DeepSpeedStrategy) and z3.config["zero_optimization"]["stage"] == 3


def test_hf_zero3_tells_transformers_only_while_building():
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from safealign.sharding import hf_zero3

    cfg = deepspeed_config(stage=3)
    with hf_zero3(cfg):
        assert is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled()
    with hf_zero3(deepspeed_config(stage=2)):
        assert not is_deepspeed_zero3_enabled()


@pytest.mark.parametrize(
    ("strategy", "devices", "expected"),
    [("auto", 2, False), ({"_target_": "lightning.pytorch.strategies.DDPStrategy"}, 2, True),
     ({"_target_": "lightning.pytorch.strategies.DDPStrategy", "start_method": "spawn"}, 2, False),
     ({"_target_": "lightning.pytorch.strategies.DDPStrategy"}, 1, False),
     ({"_target_": "lightning.pytorch.strategies.DDPStrategy"}, "auto", True),
     ({"_target_": "lightning.pytorch.strategies.DDPStrategy"}, [0, 1], True),
     ({"_target_": "lightning.pytorch.strategies.DDPStrategy"}, -1, True), ("ddp", 4, True),
     ({"_target_": "safealign.strategies.FSDP2Strategy"}, 2, True),
     ({"_target_": "safealign.strategies.DeepSpeedStrategy"}, 2, True)],
)
def test_which_strategies_re_execute_the_command(strategy, devices, expected):
    assert starts_script_subprocesses(strategy, devices) is expected


# --- slow: real multi-process runs ------------------------------------------------------------

def _env(**extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _ddp_args(tmp: Path, method: str, procs: int) -> list[str]:
    # Global batch 8 either way: 1 process x 8 or 2 processes x 4. Both runs use strategy=ddp, so
    # both get Lightning's DistributedSampler(shuffle=True, seed): rank r of W takes positions
    # r, r+W, ... of the same seeded permutation, so step k's global batch is the same 8 rows.
    # SGD, not Adam: a wrong gradient reduction (e.g. sum instead of mean) scales SGD's update
    # but would be invisible to Adam's scale-invariant step.
    data = "builtin" if method == "sft" else "builtin_pref"
    return [f"method={method}", f"data={data}", "data.source.size=96", f"data.batch_size={8 // procs}",
            "strategy=ddp", f"trainer.devices={procs}", "trainer.max_steps=3",
            "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "method.optimizer._target_=torch.optim.SGD",
            "method.optimizer.lr=1.0", f"paths.cache_dir={tmp / 'cache'}",
            f"paths.artifacts_dir={tmp / 'art'}", f"hydra.run.dir={tmp / f'{method}{procs}'}"]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    procs = {}
    for method in ("sft", "dpo"):  # all four at once: mostly import time, two cores
        for n in (1, 2):
            with open(tmp / f"{method}{n}.log", "w") as log:  # the child keeps its own descriptor
                procs[method, n] = subprocess.Popen(
                    [sys.executable, str(TRAIN), *_ddp_args(tmp, method, n)], cwd=ROOT, env=_env(),
                    stdout=log, stderr=subprocess.STDOUT)
    for (method, n), p in procs.items():
        p.wait(timeout=1200)
        assert p.returncode == 0, (tmp / f"{method}{n}.log").read_text()[-4000:]
    return tmp


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_two_process_ddp_matches_one_process(ddp_runs: Path, method: str):
    from safetensors.torch import load_file

    one, two = ddp_runs / f"{method}1", ddp_runs / f"{method}2"
    w1, w2 = (load_file(r / "model" / "model.safetensors") for r in (one, two))
    for k in w1:  # measured: max |diff| 2e-8 (SFT), 4e-7 (DPO); weights are O(1)
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0, msg=k)
    # the gradient norm is logged after DDP's all-reduce: the same global gradient every step
    g1 = [r["train/grad_norm"] for r in _history(one)]
    g2 = [r["train/grad_norm"] for r in _history(two)]
    assert len(g1) == len(g2) == 3
    torch.testing.assert_close(torch.tensor(g2), torch.tensor(g1), rtol=1e-4, atol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _smoke_module():
    spec = importlib.util.spec_from_file_location("deepspeed_smoke", ROOT / "scripts" / "deepspeed_smoke.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ZERO = ("z2", "z3", "z3_offload")


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "scripts" / "deepspeed_smoke.py"), *ZERO, "--out-dir", str(out)]
    # the gloo/shm comm extension is compiled once (~50 s) and cached under the repo's .cache/
    env = _env(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ZERO)
def test_raw_deepspeed_zero_on_two_cpu_processes_matches_plain_pytorch(zero_runs: Path, name: str):
    from safetensors.torch import load_file

    smoke = _smoke_module()
    got = json.loads((zero_runs / f"{name}.json").read_text())
    stage, offload = smoke.CONFIGS[name]
    assert got["world_size"] == 2
    assert got["config"]["zero_optimization"] == deepspeed_config(stage, offload, pin_memory=False)["zero_optimization"]
    ref_losses, ref_state = smoke.reference(len(got["losses"]), 2 * got["micro_batch"], seed=0)
    # measured: losses equal to the last digit, weights within 1e-6
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert got["losses"][-1] < got["losses"][0]  # the same batch every step: memorised
    weights = load_file(zero_runs / f"{name}.safetensors")
    for k, v in ref_state.items():
        torch.testing.assert_close(weights[k], v, atol=1e-5, rtol=0, msg=k)
