"""Resume: exact mid-epoch restart, checkpoint choice and checks, and killed/requeued runs that end
with the same weights as an uninterrupted run (CPU, deterministic)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.fabric.utilities.types import _Stateful

from safealign.data.loader import ResumableDataLoader
from safealign.errors import ConfigError
from safealign.hydra_callbacks import check_explicit_checkpoint
from safealign.io import write_json
from safealign.resume import (
    FINGERPRINT,
    CheckpointOnSignal,
    resolve_ckpt_path,
    run_fingerprint,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = Path(os.environ.get("SAFEALIGN_TRAIN_PY", ROOT / "train.py"))  # the real entry point


def _loader(seed: int = 3) -> ResumableDataLoader:
    return ResumableDataLoader(list(range(23)), batch_size=4, shuffle=True,
                               generator=torch.Generator().manual_seed(seed))


def _epochs(loader, n: int) -> list[list[list[int]]]:
    return [[b.tolist() for b in loader] for _ in range(n)]


def test_loader_restarts_mid_epoch_with_the_same_batches():
    ref = _epochs(_loader(), 3)
    assert ref[0] != ref[1]  # reshuffled every epoch
    live = _loader()
    _epochs(live, 1)
    it = iter(live)
    seen = [next(it).tolist() for _ in range(2)]  # epoch 1, two batches consumed
    state = live.state_dict()
    assert state["batches"] == 2 and isinstance(live, _Stateful)
    fresh = _loader()  # a new process: same seed, fresh generator
    fresh.load_state_dict(state)
    assert seen + [b.tolist() for b in fresh] == ref[1]
    assert [b.tolist() for b in fresh] == ref[2]  # and the following epoch is unchanged


def test_loader_state_after_a_complete_epoch_starts_the_next_one():
    ref = _epochs(_loader(), 2)
    live = _loader()
    _epochs(live, 1)
    fresh = _loader()
    fresh.load_state_dict(live.state_dict())
    assert [b.tolist() for b in fresh] == ref[1]


def test_an_iterator_dropped_before_its_first_batch_does_not_shift_the_order():
    # Lightning resuming from a checkpoint taken after an epoch's last batch (end of validation)
    # opens an iterator for the finished epoch, drops it unused, then opens the next epoch's
    ref = _epochs(_loader(), 2)
    live = _loader()
    _epochs(live, 1)
    fresh = _loader()
    fresh.load_state_dict(live.state_dict())
    iter(fresh)  # dropped before its first batch
    assert [b.tolist() for b in fresh] == ref[1]
    mid = _loader()
    it = iter(mid)
    next(it)
    state = mid.state_dict()  # one batch into epoch 0
    again = _loader()
    again.load_state_dict(state)
    iter(again)
    assert [b.tolist() for b in again] == ref[0][1:]  # the skip survives the dropped iterator


def test_checkpoint_callback_saves_and_restores_the_torch_rng():
    cb = CheckpointOnSignal("unused")
    state = cb.state_dict()
    expected = torch.rand(3)
    torch.rand(5)
    cb.load_state_dict(state)
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(ConfigError, match="SIGNOPE"):
        CheckpointOnSignal("x", signals=["SIGNOPE"])


def _cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={tmp_path / 'run'}",
                                           f"paths.root_dir={tmp_path}", *overrides])


def _fake_checkpoint(path: Path, fingerprint: dict | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"model.w": torch.zeros(2)}, "loops": {}, "epoch": 0}, path)
    if fingerprint is not None:
        write_json(path.parent / FINGERPRINT, fingerprint)
    return path


def test_resolve_null_auto_last_and_missing(tmp_path: Path):
    ckpts = tmp_path / "run" / "checkpoints"
    assert resolve_ckpt_path(_cfg(tmp_path, "ckpt_path=null")) is None
    assert resolve_ckpt_path(_cfg(tmp_path, "ckpt_path=auto")) is None  # nothing yet: fresh
    assert (ckpts / FINGERPRINT).exists()  # the run's identity is recorded beside its checkpoints
    with pytest.raises(ConfigError, match="no checkpoint"):
        resolve_ckpt_path(_cfg(tmp_path, "ckpt_path=last"))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_ckpt_path(_cfg(tmp_path, f"ckpt_path={tmp_path / 'nope.ckpt'}"))
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        resolve_ckpt_path(_cfg(tmp_path, f"ckpt_path={tmp_path / 'junk.ckpt'}"))


def test_sharded_checkpoint_directories(tmp_path: Path):
    cfg = _cfg(tmp_path)
    shards = tmp_path / "ds" / "last.ckpt"
    (shards / "checkpoint").mkdir(parents=True)  # DeepSpeed's sharded layout
    write_json(shards.parent / FINGERPRINT, run_fingerprint(cfg))
    assert resolve_ckpt_path(_cfg(tmp_path, f"ckpt_path={shards}")) == str(shards)
    # torch.distributed.checkpoint (Lightning's ModelParallelStrategy / FSDP2): <name>.ckpt/.metadata
    dcp = tmp_path / "fsdp2" / "last.ckpt"
    dcp.mkdir(parents=True)
    (dcp / ".metadata").write_bytes(b"")
    (dcp / "__0_0.distcp").write_bytes(b"")
    write_json(dcp.parent / FINGERPRINT, run_fingerprint(cfg))
    assert resolve_ckpt_path(_cfg(tmp_path, f"ckpt_path={dcp}")) == str(dcp)
    (tmp_path / "plain_dir.ckpt").mkdir()
    with pytest.raises(ConfigError, match="neither a DeepSpeed nor a torch.distributed"):
        resolve_ckpt_path(_cfg(tmp_path, f"ckpt_path={tmp_path / 'plain_dir.ckpt'}"))


def test_auto_picks_the_newest_of_last_and_slurm_hpc(tmp_path: Path):
    cfg = _cfg(tmp_path, "ckpt_path=auto")
    fp = run_fingerprint(cfg)
    last = _fake_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", fp)
    assert resolve_ckpt_path(cfg) == str(last)
    hpc = _fake_checkpoint(tmp_path / "run" / "hpc_ckpt_1.ckpt", None)
    os.utime(hpc, ns=(last.stat().st_mtime_ns + 10**9,) * 2)
    assert resolve_ckpt_path(cfg) == str(hpc)


def test_checkpoint_of_another_model_is_refused_before_anything_runs(tmp_path: Path):
    other = _cfg(tmp_path, "model.lm.n_layer=4")
    ckpt = _fake_checkpoint(tmp_path / "other" / "last.ckpt", run_fingerprint(other))
    cfg = _cfg(tmp_path, f"ckpt_path={ckpt}")
    with pytest.raises(ConfigError, match=r"model\.lm\.n_layer: 4 -> 2"):
        resolve_ckpt_path(cfg)
    with pytest.raises(ConfigError, match="different configuration"):
        check_explicit_checkpoint(cfg)  # the multirun guard: before any job is launched
    same = _fake_checkpoint(tmp_path / "same" / "last.ckpt", run_fingerprint(cfg))
    assert resolve_ckpt_path(_cfg(tmp_path, f"ckpt_path={same}")) == str(same)


def test_fingerprint_ignores_cache_locations(tmp_path: Path):
    a = run_fingerprint(_cfg(tmp_path, "paths.cache_dir=/a"))
    b = run_fingerprint(_cfg(tmp_path, "paths.cache_dir=/b"))
    assert a == b and a["method"]["_target_"] == "safealign.methods.sft.SFTModule"
    assert a != run_fingerprint(_cfg(tmp_path, "seed=1"))  # other initial weights


def test_resubmitted_grid_point_with_another_beta_refuses_to_resume(tmp_path: Path):
    # the same sweep dir, re-submitted with another β: it must not continue point 0's weights
    point0 = _cfg(tmp_path, "method=dpo", "data=builtin_pref", "method.loss.beta=0.1")
    _fake_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", run_fingerprint(point0))
    other = _cfg(
        tmp_path, "method=dpo", "data=builtin_pref", "method.loss.beta=0.3", "ckpt_path=auto"
    )
    with pytest.raises(ConfigError, match=r"method\.loss\.beta: 0\.1 -> 0\.3"):
        resolve_ckpt_path(other)
    same = _cfg(
        tmp_path, "method=dpo", "data=builtin_pref", "method.loss.beta=0.1", "ckpt_path=auto"
    )
    assert resolve_ckpt_path(same).endswith("last.ckpt")


WEIGHTS_UNCHANGED = [  # run length, caches, logging, validation and bookkeeping
    "trainer.max_epochs=9",
    "trainer.max_steps=500",
    "+trainer.max_time=00:01:00:00",
    "paths.cache_dir=/elsewhere",
    "method.cache_dir=/elsewhere/ref",
    "logger=wandb",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=0.5",
    "trainer.limit_val_batches=2",
    "+trainer.num_sanity_val_steps=0",
    "tags=[a,b]",
    "task_name=other",
    "optimized_metric=val/loss",
    "trainer.callbacks=[]",
    "trainer.default_root_dir=/x",
]
WEIGHTS_CHANGED = [
    "method.loss.beta=0.2",
    "method.optimizer.lr=1.0e-3",
    "seed=3",
    "data.batch_size=4",
    "trainer.precision=bf16-mixed",
    "trainer.accumulate_grad_batches=2",
    "model.lm.n_layer=3",
    "init.trainer.max_epochs=1",  # the init stage's length decides this run's starting weights
]


def test_fingerprint_covers_exactly_what_changes_the_weights(tmp_path: Path):
    base = ["experiment=dpo_builtin"]
    ref = run_fingerprint(_cfg(tmp_path, *base))
    for override in WEIGHTS_UNCHANGED:
        assert run_fingerprint(_cfg(tmp_path, *base, override)) == ref, override
    for override in WEIGHTS_CHANGED:
        assert run_fingerprint(_cfg(tmp_path, *base, override)) != ref, override


def test_fingerprint_never_resolves_dropped_hydra_keys():
    # no Hydra runtime: paths.output_dir, trainer.default_root_dir and the callbacks' dirpaths are
    # `${hydra:runtime.output_dir}`; reading them would raise
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=dpo_builtin"])
    assert run_fingerprint(cfg)["fingerprint_version"] == 2


def test_old_fingerprint_files_are_compared_on_their_own_keys(tmp_path: Path):
    cfg = _cfg(tmp_path, "ckpt_path=auto")
    new = run_fingerprint(cfg)
    legacy = {
        "model": new["model"],
        "method": new["method"]["_target_"],
        "data.source": new["data"]["source"],
    }  # what version 1 recorded
    last = _fake_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", legacy)
    assert resolve_ckpt_path(cfg) == str(last)  # a run in flight across the upgrade resumes
    _fake_checkpoint(last, {**legacy, "method": "safealign.methods.preference.PreferenceModule"})
    with pytest.raises(ConfigError, match="method: "):
        resolve_ckpt_path(cfg)


def test_multirun_guard_resolves_hydra_paths_before_any_job(tmp_path: Path, monkeypatch):
    import copy

    from hydra.core.hydra_config import HydraConfig

    ckpt = tmp_path / "c" / "last.ckpt"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        # dpo_hh's data path is ${paths.data_dir}/... -> ${hydra:runtime.cwd}
        cfg = compose(
            "train", overrides=["experiment=dpo_hh", f"ckpt_path={ckpt}"], return_hydra_config=True
        )
    HydraConfig.instance().set_config(copy.deepcopy(cfg))
    old = run_fingerprint(cfg)
    old["data"]["source"]["path"] = "/elsewhere/test.jsonl.gz"
    _fake_checkpoint(ckpt, old)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # as in on_multirun_start
    with pytest.raises(ConfigError, match=r"data\.source\.path: '/elsewhere/test.jsonl.gz' -> '/"):
        check_explicit_checkpoint(cfg)  # resolved and compared, not an interpolation error
    assert not HydraConfig.initialized()


# --- end to end: kill, requeue, resume (slow) -------------------------------------------------

KILLER = '''
import os, signal
import lightning.pytorch as L

class SignalAtStep(L.Callback):
    """Test helper: sends a real signal to this process after optimizer step `step`."""
    def __init__(self, step: int, signal_name: str = "SIGTERM"):
        self.step, self.sig = step, getattr(signal, signal_name)
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)

class SignalInValidation(L.Callback):
    """Sends SIGUSR2 during the first (non-sanity) validation: after epoch 0's last step."""
    sent = False
    def on_validation_batch_end(self, trainer, *args, **kwargs):
        if not trainer.sanity_checking and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGUSR2)

class SignalAfterFit(L.Callback):
    """Sends SIGUSR2 after fit (listed last, after CheckpointOnSignal): lands in the export."""
    def teardown(self, trainer, pl_module, stage):
        os.kill(os.getpid(), signal.SIGUSR2)
'''
KILL_STEP = 14  # 96 built-in pairs -> 10 batches of 8 per epoch: step 14 is mid-epoch 2


def _env(tmp: Path, wandb: str = "disabled") -> dict:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE=wandb,
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        WANDB_SILENT="true",
    )
    env["PYTHONPATH"] = os.pathsep.join([str(tmp), env.get("PYTHONPATH", "")])
    return env


def _args(tmp: Path, run_dir: Path, kill: str | None, extra: str | None = None) -> list[str]:
    ckpts = run_dir / "checkpoints"
    # ModelCheckpoint every 50 steps never fires here: the only checkpoint is the signal's
    callbacks = [
        "{_target_:lightning.pytorch.callbacks.ModelCheckpoint,"
        f"dirpath:'{ckpts}',save_last:true,save_top_k:0,every_n_train_steps:50}}",
        f"{{_target_:safealign.resume.CheckpointOnSignal,dirpath:'{ckpts}'}}",
    ]
    if kill:
        callbacks.append(f"{{_target_:killer.SignalAtStep,step:{KILL_STEP},signal_name:{kill}}}")
    if extra:  # another helper from KILLER, e.g. SignalInValidation
        callbacks.append(f"{{_target_:killer.{extra}}}")
    return [
        "method=dpo",
        "data=builtin_pref",
        "data.source.size=96",
        "data.batch_size=8",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        f"paths.cache_dir={tmp / 'cache'}",
        f"paths.artifacts_dir={tmp / 'art'}",
        "ckpt_path=auto",
        f"trainer.callbacks=[{','.join(callbacks)}]",
    ]


def _start(args: list[str], tmp: Path, log: str, wandb: str = "disabled") -> subprocess.Popen:
    with open(tmp / log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, str(TRAIN), *args],
            cwd=ROOT,
            env=_env(tmp, wandb),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("resume")
    (tmp / "killer.py").write_text(KILLER)
    full, killed, sweep = tmp / "full", tmp / "killed", tmp / "sweep"
    procs = {  # three independent processes at once: the machine has two cores, they mostly wait
        "full": _start([*_args(tmp, full, None), f"hydra.run.dir={full}"], tmp, "full.log"),
        "killed": _start([*_args(tmp, killed, "SIGTERM"), f"hydra.run.dir={killed}"], tmp, "killed.log"),
        # submitit: SIGUSR2 = the scheduler's time-out/preemption warning -> checkpoint -> requeue
        "requeued": _start([*_args(tmp, sweep / "0", "SIGUSR2"), "launcher=submitit_local",
                            f"hydra.sweep.dir={sweep}"], tmp, "requeued.log"),
    }
    codes = {k: p.wait(timeout=1200) for k, p in procs.items()}
    after_kill = {"has_metrics": (killed / "metrics.json").exists(),
                  "has_ckpt": (killed / "checkpoints" / "last.ckpt").exists()}
    rerun = subprocess.run([sys.executable, str(TRAIN), *_args(tmp, killed, "SIGTERM"),
                            f"hydra.run.dir={killed}"], cwd=ROOT, env=_env(tmp),
                           capture_output=True, text=True, timeout=1200)
    return {"tmp": tmp, "codes": codes, "after_kill": after_kill, "rerun": rerun,
            "full": full, "killed": killed, "requeued": sweep / "0"}


def _log(runs: dict, name: str) -> str:
    return (runs["tmp"] / f"{name}.log").read_text()


@pytest.mark.slow
def test_sigterm_then_rerun_gives_identical_weights(runs):
    assert runs["codes"]["full"] == 0, _log(runs, "full")[-3000:]
    # killed mid-epoch: exit status of a SIGTERM'd process, a checkpoint, no final outputs
    assert runs["codes"]["killed"] == 128 + signal.SIGTERM, _log(runs, "killed")[-3000:]
    assert runs["after_kill"] == {"has_metrics": False, "has_ckpt": True}
    ckpt = torch.load(runs["killed"] / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    assert ckpt["global_step"] == KILL_STEP
    assert runs["rerun"].returncode == 0, runs["rerun"].stdout[-3000:] + runs["rerun"].stderr[-3000:]
    assert "resuming from" in runs["rerun"].stdout + runs["rerun"].stderr
    full, resumed = _weights(runs["full"]), _weights(runs["killed"])
    assert full.keys() == resumed.keys()
    for k in full:  # bit-identical: same batches, same order, same optimizer and RNG state
        assert torch.equal(full[k], resumed[k]), k


@pytest.mark.slow
def test_preempted_submitit_job_requeues_and_resumes_to_identical_weights(runs):
    assert runs["codes"]["requeued"] == 0, _log(runs, "requeued")[-3000:]
    logs = "".join(p.read_text() for p in (runs["tmp"] / "sweep" / ".submitit").rglob("*_log.*"))
    assert "stopping at the next safe point" in logs and "training batch boundary" in logs
    assert "Requeued job" in logs and "resuming from" in logs
    full, requeued = _weights(runs["full"]), _weights(runs["requeued"])
    for k in full:
        assert torch.equal(full[k], requeued[k]), k


@pytest.fixture(scope="module")
def stops(runs) -> dict:
    """SIGUSR2 during validation, and after fit (in the export, with an offline W&B run)."""
    tmp = runs["tmp"]
    val, after = tmp / "val", tmp / "after"
    procs = {
        "val": _start(
            [*_args(tmp, val, None, "SignalInValidation"), f"hydra.run.dir={val}"], tmp, "val.log"
        ),
        "after": _start(
            [*_args(tmp, after, None, "SignalAfterFit"), "logger=wandb", f"hydra.run.dir={after}"],
            tmp,
            "after.log",
            wandb="offline",
        ),
    }
    codes = {k: p.wait(timeout=1200) for k, p in procs.items()}
    val_state = {
        "has_metrics": (val / "metrics.json").exists(),
        "step": _global_step(val / "checkpoints" / "last.ckpt"),
    }
    rerun = subprocess.run(
        [sys.executable, str(TRAIN), *_args(tmp, val, None), f"hydra.run.dir={val}"],
        cwd=ROOT,
        env=_env(tmp),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    return {
        **runs,
        "stop_codes": codes,
        "val_state": val_state,
        "val_rerun": rerun,
        "val": val,
        "after": after,
    }


def _global_step(ckpt: Path) -> int | None:
    if not ckpt.exists():
        return None
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
def test_stop_during_validation_saves_then_rerun_gives_identical_weights(stops):
    assert stops["stop_codes"]["val"] == 128 + signal.SIGUSR2, _log(stops, "val")[-3000:]
    assert "honouring SIGUSR2 (end of validation)" in _log(stops, "val")
    assert stops["val_state"] == {"has_metrics": False, "step": 10}  # epoch 0's 10 steps
    rerun = stops["val_rerun"]
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout + rerun.stderr
    full, resumed = _weights(stops["full"]), _weights(stops["val"])
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


@pytest.mark.slow
def test_stop_after_fit_is_honoured_when_train_returns(stops):
    log = _log(stops, "after")
    assert stops["stop_codes"]["after"] == 128 + signal.SIGUSR2, log[-3000:]
    assert "honouring SIGUSR2 (end of train)" in log
    assert "preempting: the sweep re-runs it" in log  # W&B's sweep controller re-queues the run
    assert (stops["after"] / "metrics.json").exists()  # the export finished first
    full, after = _weights(stops["full"]), _weights(stops["after"])
    for k in full:
        assert torch.equal(full[k], after[k]), k
