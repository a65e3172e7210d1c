"""GPU acceptance check (issue 9 item 8): every sharded strategy x SFT/DPO/ADPO on model=tiny_llama.

    scripts/gpu_check.sh                        # all cells on every visible GPU (1-8)
    scripts/gpu_check.sh --dry-run              # plan + compose every cell's config, run nothing
    scripts/gpu_check.sh --strategies ddp,fsdp2 --methods sft,dpo
    scripts/gpu_check.sh --cells fsdp2/sft,fsdp2/dpo trainer.precision=32-true

Each cell runs `train.py` in its own process group (killed at the timeout). DPO and ADPO start
from the same strategy's SFT export (`model=hf model.name_or_path=<sft run>/model`, the
experiments' `init` stage removed), so the export under test is also the model loaded next.
Each finished cell is judged from its run dir (`gpu_check_verdicts.judge`: exit status, step-0
KL, final loss, export). Exit status 1 if any cell fails.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# scripts/ is sys.path[0] when run as `python scripts/gpu_check.py` (what gpu_check.sh does).
from gpu_check_verdicts import Cell, Row, judge, table

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
STRATEGIES = ("ddp", "deepspeed_z2", "deepspeed_z3", "fsdp", "fsdp2")
METHODS = {"sft": "sft_builtin", "dpo": "dpo_builtin", "adpo": "adpo_builtin"}
MONITOR = {"_target_": "safealign.monitor.ThroughputMonitor"}
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Plan:
    out: Path
    devices: int
    trainer: str = "gpu"
    max_steps: int = 8
    timeout_s: int = 900
    extra: tuple[str, ...] = ()

    def run_dir(self, cell: Cell) -> Path:
        return self.out / cell.strategy / cell.method


# --- configs: the same override list for --dry-run and for the real run -------------------------


def compose(overrides: list[str]):
    """Compose conf/train.yaml exactly as `python train.py <overrides>` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=overrides, return_hydra_config=True)


def hydra_literal(value) -> str:
    """`value` in Hydra's override grammar; strings quoted, so `${...}` stays an interpolation."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_literal(v) for v in value) + "]"
    text = str(value)
    quote = '"' if '"' not in text else "'"
    if quote in text:
        raise ValueError(f"cannot quote {text!r} for a Hydra override")
    return f"{quote}{text}{quote}"


def base_overrides(cell: Cell, plan: Plan) -> list[str]:
    run = plan.run_dir(cell)
    ov = [
        f"experiment={METHODS[cell.method]}",
        f"strategy={cell.strategy}",
        f"trainer={plan.trainer}",
        f"trainer.devices={plan.devices}",
        f"trainer.max_steps={plan.max_steps}",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"hydra.run.dir={run}",
        f"paths.cache_dir={plan.out / 'cache' / cell.strategy / cell.method}",  # own reference
        f"paths.artifacts_dir={plan.out / 'artifacts'}",
    ]
    if cell.method == "sft":
        ov.append("model=tiny_llama")
    else:  # start from this strategy's SFT export instead of the experiment's init stage
        sft = plan.run_dir(Cell(cell.strategy, "sft")) / "model"
        ov += ["~init", "model=hf", f"model.name_or_path={sft}"]
    return ov + list(plan.extra)


def cell_overrides(cell: Cell, plan: Plan) -> list[str]:
    """Base overrides + the trainer's callbacks with ThroughputMonitor appended (Hydra 1.3 has
    no list append on the command line, so the whole list is passed, interpolations intact)."""
    from omegaconf import OmegaConf

    base = base_overrides(cell, plan)
    callbacks = OmegaConf.to_container(compose(base).trainer.get("callbacks") or [], resolve=False)
    return [*base, "trainer.callbacks=" + hydra_literal([*callbacks, MONITOR])]


def check_composed(cfg) -> None:
    """What a real run would hit before any GPU work: missing `???`, broken interpolations, a
    strategy or callback class that does not import."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_class
    from omegaconf import OmegaConf, open_dict

    from safealign.utils import check_required

    with open_dict(cfg):  # what Hydra's run_job sets for a single run
        cfg.hydra.runtime.output_dir = cfg.hydra.run.dir
        cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig.instance().set_config(cfg)
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    check_required(body)
    OmegaConf.resolve(body)
    strategy = body.trainer.strategy
    if not isinstance(strategy, str):
        get_class(strategy._target_)
    targets = [c._target_ for c in body.trainer.callbacks]
    if targets[-1] != MONITOR["_target_"]:
        raise ValueError(f"ThroughputMonitor is not the last callback: {targets}")
    for t in targets:
        get_class(t)


# --- running ------------------------------------------------------------------------------------


def run_cell(cell: Cell, overrides: list[str], plan: Plan) -> int | None:
    """Run train.py for one cell in a new process group; its exit status, None on time-out."""
    run_dir = plan.run_dir(cell)
    shutil.rmtree(run_dir, ignore_errors=True)  # never judge a previous run's files
    log_path = plan.out / "logs" / f"{cell.strategy}_{cell.method}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides]
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, **ENV},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Lightning's rank processes join this group
        )
        try:
            return proc.wait(timeout=plan.timeout_s)
        except subprocess.TimeoutExpired:
            return None
        finally:  # time-out, Ctrl-C, or ranks left hanging after rank 0 exited
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return  # the whole group has exited
        if grace and proc.poll() is None:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass


def select_cells(strategies: list[str], methods: list[str], names: list[str]) -> list[Cell]:
    """`names` ("strategy/method") win over the two lists; SFT always runs before DPO/ADPO."""
    bad = [n for n in names if n.count("/") != 1]
    if bad:
        raise ValueError(f"cells are strategy/method, got {bad}")
    cells = [Cell(*n.split("/")) for n in names] or [
        Cell(s, m) for s in strategies for m in methods
    ]
    unknown = sorted({c.method for c in cells} - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    order = list(dict.fromkeys([*STRATEGIES, *(c.strategy for c in cells)]))
    return sorted(
        set(cells), key=lambda c: (order.index(c.strategy), list(METHODS).index(c.method))
    )


def _gpus() -> tuple[int, str]:
    import torch

    n = min(torch.cuda.device_count(), 8)
    bf16 = n == 0 or torch.cuda.is_bf16_supported()
    return n, "gpu" if bf16 else "gpu_v100"  # V100: no bf16, fp16 mixed precision


def dry_run(cells: list[Cell], plan: Plan) -> int:
    failures = 0
    for cell in cells:
        try:
            overrides = cell_overrides(cell, plan)
            check_composed(compose(overrides))
            status = "composes"
        except Exception as e:  # report every cell, then fail
            failures += 1
            status = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            overrides = base_overrides(cell, plan) + ["trainer.callbacks=[...]"]
        print(f"{cell.name}: {status}\n  python train.py {shlex.join(overrides)}")
    print(f"\n{len(cells) - failures}/{len(cells)} cells compose")
    return 1 if failures or not cells else 0


def run_all(cells: list[Cell], plan: Plan) -> int:
    rows = []
    for cell in cells:
        sft = plan.run_dir(Cell(cell.strategy, "sft")) / "model"
        if cell.method != "sft" and not sft.is_dir():
            rows.append(Row(cell, problems=[f"needs the SFT export {sft}"]))
            continue
        print(f"[gpu_check] {cell.name} ...", flush=True)
        code = run_cell(cell, cell_overrides(cell, plan), plan)
        rows.append(judge(cell, plan.run_dir(cell), code))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    report = table(rows)
    (plan.out / "report.md").write_text(report + "\n", encoding="utf-8")
    print(f"\n{report}\n\nlogs: {plan.out / 'logs'}   table: {plan.out / 'report.md'}")
    return 0 if all(r.ok for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan, compose every cell")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--cells", default="", help="e.g. ddp/sft,fsdp2/dpo (replaces the two lists)")
    p.add_argument("--devices", type=int, default=0, help="default: every visible GPU, at most 8")
    p.add_argument("--trainer", default="", help="default: gpu (bf16), gpu_v100 without bf16")
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every cell")
    a = p.parse_args(argv)
    split = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    try:
        cells = select_cells(split(a.strategies), split(a.methods), split(a.cells))
    except ValueError as e:
        p.error(str(e))
    gpus, trainer = _gpus()
    if not a.dry_run and gpus == 0 and not a.devices:
        print("gpu_check: no CUDA GPU visible (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    plan = Plan(
        a.out.resolve(),
        a.devices or max(gpus, 1),
        a.trainer or trainer,
        a.max_steps,
        a.timeout,
        tuple(a.overrides),
    )
    print(
        f"gpu_check: {len(cells)} cells, trainer={plan.trainer}, devices={plan.devices}, "
        f"max_steps={plan.max_steps}, out={plan.out}"
    )
    return dry_run(cells, plan) if a.dry_run else run_all(cells, plan)


if __name__ == "__main__":
    sys.exit(main())
