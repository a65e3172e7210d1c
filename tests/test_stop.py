"""Stop requests (safealign/stop.py) and CheckpointOnSignal: a real SIGUSR2 sent to this process
is recorded, then honoured at the next safe point wherever it lands: a loop's `check`,
validation, the end of training, teardown, or when the task function returns."""

from __future__ import annotations

import os
import signal
import sys
import types
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from torch.utils.data import DataLoader, TensorDataset

from safealign import stop
from safealign.data.loader import ResumableDataLoader
from safealign.errors import ConfigError
from safealign.resume import CheckpointOnSignal

USR2 = signal.SIGUSR2


@pytest.fixture(autouse=True)
def clean_registry():
    before = signal.getsignal(USR2)
    yield
    stop.uninstall()
    stop.clear()
    signal.signal(USR2, before)


def _send() -> None:
    os.kill(os.getpid(), USR2)  # Python runs the handler at the next bytecode boundary


def test_signal_is_recorded_then_honoured_as_a_clean_exit_with_the_signal_status():
    signal.signal(USR2, signal.SIG_DFL)  # the default action would kill pytest
    assert stop.install(["SIGUSR2"]) == [USR2]
    assert stop.install(["USR2"]) == []  # idempotent
    stop.check("nothing pending")  # no request: returns
    _send()
    assert stop.requested()
    with pytest.raises(stop.StopRequested) as e:
        stop.check("loop")
    assert e.value.code == 128 + USR2 and e.value.where == "loop"
    assert not stop.requested()
    assert signal.getsignal(USR2) == signal.SIG_IGN  # a repeated signal cannot cut the exit short


def test_the_replaced_handler_runs_first_like_submitits_requeue():
    calls = []
    signal.signal(USR2, lambda signum, frame: calls.append(signum))
    stop.install()
    _send()
    assert calls == []  # recorded only: nothing acted inside the handler
    with pytest.raises(stop.StopRequested):
        stop.honour("test")
    assert calls == [USR2]

    def requeue_and_exit(signum, frame):  # submitit on rank 0
        sys.exit(-1)

    signal.signal(USR2, requeue_and_exit)
    stop.install()
    _send()
    with pytest.raises(SystemExit) as e:
        stop.check("loop")
    assert e.value.code == -1 and not isinstance(e.value, stop.StopRequested)


def test_an_ignored_signal_stays_ignored():
    signal.signal(USR2, signal.SIG_IGN)
    stop.install()
    _send()
    assert stop.requested()
    stop.check("loop")  # returns: the process chose to ignore this signal


def test_install_never_records_itself_as_the_replaced_handler():
    signal.signal(USR2, signal.SIG_DFL)
    mine = stop.install()
    stop.uninstall(mine)
    assert signal.getsignal(USR2) == signal.SIG_DFL
    stop.install()
    stop.uninstall([])  # nothing of ours: no change
    handler = signal.getsignal(USR2)
    stop.uninstall()
    signal.signal(USR2, handler)  # put back behind our back (Lightning's signal-connector teardown)
    stop.install()
    _send()
    with pytest.raises(stop.StopRequested):  # the default action, not a loop into our handler
        stop.check("loop")


def test_an_open_wandb_run_is_marked_preempting(monkeypatch):
    marked = []
    run = types.SimpleNamespace(id="abc123", mark_preempting=lambda: marked.append(True))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=run))
    stop.install()
    _send()
    with pytest.raises(stop.StopRequested):
        stop.check("loop")
    assert marked == [True]
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=None))
    assert stop.mark_wandb_preempting() is False


def test_a_task_honours_a_request_that_arrives_after_its_work():
    done = []

    @stop.honoured
    def task() -> str:
        done.append("exported")
        _send()  # e.g. during the export, after fit
        return "metric"

    signal.signal(USR2, signal.SIG_DFL)
    with pytest.raises(stop.StopRequested):
        task()
    assert done == ["exported"]
    handler_free = stop.honoured(lambda: "ok")
    assert handler_free() == "ok" and not stop.requested()


def test_unknown_signal_name():
    with pytest.raises(ConfigError, match="SIGNOPE"):
        stop.signal_number("SIGNOPE")


# --- CheckpointOnSignal inside a real (tiny, CPU) Lightning fit --------------------------------


class SendAt(L.Callback):
    """Sends SIGUSR2 to this process from one hook (first call only)."""

    def __init__(self, hook: str, sanity: bool = False) -> None:
        self.hook, self.sanity, self.sent = hook, sanity, False
        setattr(self, hook, self._maybe_send)

    def _maybe_send(self, trainer, *args, **kwargs) -> None:
        if not self.sent and trainer.sanity_checking == self.sanity:
            self.sent = True
            _send()


class PrecomputeModel(BoringModel):
    """A reference precompute in on_fit_start that checks for a stop between batches."""

    batches = 0

    def on_fit_start(self) -> None:
        for i in range(4):
            if i == 1:
                _send()
            stop.check("reference precompute")
            self.batches += 1


def _fit(tmp_path: Path, *callbacks: L.Callback, model=None, sanity: int = 0) -> Path:
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, limit_train_batches=4, limit_val_batches=2,
        num_sanity_val_steps=sanity, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[*callbacks, CheckpointOnSignal(str(tmp_path))],
    )  # fmt: skip
    signal.signal(USR2, signal.SIG_DFL)
    with pytest.raises(stop.StopRequested):
        trainer.fit(model or BoringModel())
    return tmp_path / "last.ckpt"


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


def test_stop_during_validation_saves_at_the_end_of_validation(tmp_path: Path):
    ckpt = _fit(tmp_path, SendAt("on_validation_batch_end"))
    assert _step(ckpt) == 4  # epoch 0's 4 steps, then its validation


def test_stop_during_the_sanity_check_exits_without_a_checkpoint(tmp_path: Path):
    ckpt = _fit(tmp_path, SendAt("on_validation_batch_end", sanity=True), sanity=1)
    assert not ckpt.exists()  # nothing was trained yet: the previous checkpoint stays the newest


def test_stop_in_the_reference_precompute_is_honoured_by_its_check(tmp_path: Path):
    model = PrecomputeModel()
    ckpt = _fit(tmp_path, model=model)
    assert model.batches == 1 and not ckpt.exists()  # stopped between precompute batches


def test_stop_at_the_end_of_training_saves_the_final_state(tmp_path: Path):
    ckpt = _fit(tmp_path, SendAt("on_train_end"))  # sent before CheckpointOnSignal's hook
    assert _step(ckpt) == 8


def test_stop_after_fit_is_honoured_at_teardown_when_the_callback_owns_the_handlers(tmp_path):
    ckpt = _fit(tmp_path, SendAt("on_fit_end"))  # no task wrapper installed the handlers
    assert not ckpt.exists()  # after fit the trainer cannot save; the run is complete anyway


class ShuffledModel(L.LightningModule):
    """Records the training batches it sees; data through the resumable, shuffled loader."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[list[float]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0].flatten().tolist())
        return self.layer(batch[0]).pow(2).sum()

    def validation_step(self, batch, batch_idx) -> None:
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = TensorDataset(torch.arange(8.0).view(-1, 1))
        return ResumableDataLoader(data, batch_size=2, shuffle=True,
                                   generator=torch.Generator().manual_seed(0))  # fmt: skip

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2)


def test_resume_from_a_stop_at_the_end_of_validation_continues_exactly(tmp_path: Path):
    def trainer(*callbacks: L.Callback) -> L.Trainer:
        return L.Trainer(
            accelerator="cpu", max_epochs=2, num_sanity_val_steps=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[*callbacks, CheckpointOnSignal(str(tmp_path))],
        )  # fmt: skip

    torch.manual_seed(0)
    full = ShuffledModel()
    trainer().fit(full)
    torch.manual_seed(0)
    stopped = ShuffledModel()
    signal.signal(USR2, signal.SIG_DFL)
    with pytest.raises(stop.StopRequested):
        trainer(SendAt("on_validation_batch_end")).fit(stopped)
    torch.manual_seed(1)  # the checkpoint, not the seed, decides what follows
    resumed = ShuffledModel()
    trainer().fit(resumed, ckpt_path=tmp_path / "last.ckpt")
    assert stopped.seen + resumed.seen == full.seen  # epoch 1 reshuffled exactly as without a stop
    assert torch.equal(resumed.layer.weight, full.layer.weight)


def _collective_check(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    stop.check("nothing pending anywhere")  # both return
    if rank == 1:
        stop._record(USR2, None)  # only rank 1 received the signal
    try:
        stop.check("sharded loop")
        result = "continued"
    except stop.StopRequested:
        result = "stopped"
    Path(out, f"rank{rank}").write_text(result)
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_decision_is_collective_across_ranks(tmp_path: Path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_collective_check, args=(port, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["stopped", "stopped"]
