"""safealign DPO/ADPO vs TRL DPOTrainer: training throughput and peak memory (issue 3).

Run: .venv/bin/python bench/preference.py [--repeats 3] [--max-load 1.5] [--steps 30] [--smoke]
     .venv/bin/python bench/preference.py --data hh [--repeats 3]   # HH-RLHF pairs, long contexts

Every row trains the same config-built GPT-2 on the same built-in preference triples with the
same batch size, max length, fp32, AdamW (lr, no weight decay, constant), grad clip 1.0, torch
threads and number of optimizer steps, each row in its own process (peak RSS is per row).
safealign runs through the real PreferenceModule and a Lightning Trainer, TRL through
DPOTrainer.train; both are timed by a callback at the end of every optimizer step, so data
loading, hooks and logging are inside the step time. The first ``--warmup`` steps are excluded.
Precomputed-reference rows report training throughput WITHOUT the one-time precompute, and the
precompute time in its own column. Results also go to bench/results/preference.json.
On a shared machine, wall time follows the other processes' load far more than anything measured
here: use --repeats (best run kept per row) and --max-load (wait for a quiet moment per row); the
CPU-time columns and the load at the start of each run (in the JSON) show how disturbed a run was.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from common import (
    StepClock,
    add_dataclass_args,
    best_runs,
    current_rss_mb,
    dataclass_from_args,
    emit_row,
    fmt,
    load_average,
    markdown_table,
    peak_rss_mb,
    run_row,
    wait_for_quiet,
)

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results" / "preference.json"
# name -> (framework, method, reference precomputed?, shared-prompt forward?)
ROWS: dict[str, tuple[str, str, bool, bool]] = {
    "safealign DPO": ("safealign", "dpo", True, True),
    "safealign DPO otf": ("safealign", "dpo", False, True),
    "safealign ADPO": ("safealign", "adpo", True, True),
    "safealign ADPO otf": ("safealign", "adpo", False, True),
    "safealign DPO unshared": ("safealign", "dpo", True, False),
    "safealign ADPO unshared": ("safealign", "adpo", True, False),
    "TRL DPO": ("trl", "dpo", True, False),
    "TRL DPO otf": ("trl", "dpo", False, False),
}
DEFAULT_ROWS = ["safealign DPO", "safealign ADPO", "safealign DPO unshared",
                "safealign ADPO unshared", "TRL DPO"]  # fmt: skip
REPO = HERE.parent.parent
HH_FILE = REPO.parent / "shared" / "data" / "hh_rlhf_harmless_base" / "test.jsonl.gz"
# --data hh: HH-RLHF harmless-base pairs (multi-turn contexts, longer than the responses).
# Pairs whose prompt + longer response exceed HH_MAX_CHARS are skipped so that neither framework
# truncates anything (max_length below holds every kept pair; checked in setup).
HH = {"max_prompt_length": 448, "max_length": 512, "batch_size": 4, "steps": 15}
HH_MAX_CHARS = 1200


@dataclass(frozen=True)
class Config:
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    vocab_size: int = 2048
    batch_size: int = 8  # preference pairs per optimizer step
    max_prompt_length: int = 64
    max_length: int = 128  # longer than every built-in row: nothing is truncated on either side
    steps: int = 30
    warmup: int = 3
    lr: float = 5e-5
    threads: int = 2
    data_size: int = 2000
    seed: int = 0
    data: str = "builtin"  # builtin | hh
    dpo_beta: float = 0.9  # conf/method/dpo.yaml
    adpo_beta: float = 0.3  # conf/method/adpo.yaml
    adpo_gamma: float = 0.2


SMOKE = {"n_layer": 1, "n_head": 2, "n_embd": 32, "vocab_size": 512, "batch_size": 2,
         "steps": 2, "warmup": 1, "data_size": 300}  # fmt: skip


# ---------------------------------------------------------------- shared setup (child side)
def setup(cfg: Config, needs_toxic: bool):
    """The row's training examples, DataModule (encoded) and tokenizer: identical for all rows."""
    import torch

    from safealign.data.builtin import builtin_preferences
    from safealign.data.datamodule import DataModule
    from safealign.models import train_bpe_tokenizer
    from safealign.types import Corpus, PreferenceExample

    torch.set_num_threads(cfg.threads)
    n = cfg.batch_size * (
        cfg.warmup + cfg.steps
    )  # exactly one epoch: every row sees every pair once
    corpus = hh_pairs() if cfg.data == "hh" else builtin_preferences(size=cfg.data_size, seed=cfg.seed)
    if len(corpus.train) < n:
        raise ValueError(f"{cfg.data} data gives {len(corpus.train)} pairs, need {n}")
    # Train split only: both frameworks precompute the reference over the same n pairs.
    data = Corpus(train=corpus.train[:n], val=[], test=[], name="builtin-bench")
    dm = DataModule(data, batch_size=cfg.batch_size, max_prompt_length=cfg.max_prompt_length,
                    max_length=cfg.max_length, seed=cfg.seed)  # fmt: skip
    tok = train_bpe_tokenizer(dm.texts(), vocab_size=cfg.vocab_size, cache_dir=None)
    dm.attach(tok, PreferenceExample, needs_toxic)
    if dm.stats["truncated"]:
        raise ValueError(f"{dm.stats['truncated']} rows truncated: raise --max-length")
    return data.train, dm, tok


def hh_pairs():
    """HH-RLHF harmless-base test pairs (../shared/data) short enough not to be truncated. HH has
    no toxic responses: for the ADPO rows the third branch is the rejected text again (timing
    only: it has the length and the shared prompt of a real toxic branch)."""
    from safealign.data.sources import load_hh_rlhf
    from safealign.types import Corpus, PreferenceExample

    if not HH_FILE.is_file():
        raise SystemExit(f"--data hh needs {HH_FILE} (../shared/data beside the checkout)")
    rows = [e for e in load_hh_rlhf(HH_FILE, split="train").train
            if len(e.prompt) + max(len(e.chosen), len(e.rejected)) <= HH_MAX_CHARS]  # fmt: skip
    return Corpus(train=[PreferenceExample(e.prompt, e.chosen, e.rejected, e.rejected, "hh")
                         for e in rows], name="hh-bench")  # fmt: skip


def model_factory(cfg: Config):
    from safealign.models import build_tiny_gpt2

    return partial(build_tiny_gpt2, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                   n_positions=cfg.max_length, dropout=0.0, seed=cfg.seed)  # fmt: skip


def vocab_hash(tok) -> str:
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:12]


def timed(sink: dict, fn):
    """Call ``fn`` and add its wall time to ``sink['precompute_s']``."""
    start = time.perf_counter()
    out = fn()
    sink["precompute_s"] = sink.get("precompute_s", 0.0) + time.perf_counter() - start
    return out


# ---------------------------------------------------------------- safealign row
def run_safealign(cfg: Config, method: str, precompute: bool, shared: bool) -> dict:
    import lightning.pytorch as L
    import torch

    from safealign.losses import adpo_loss, dpo_loss
    from safealign.methods.preference import PreferenceModule

    sink: dict = {}

    class Timed(PreferenceModule):
        def _load_or_compute_reference(self):
            return timed(sink, super()._load_or_compute_reference)

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.clock = StepClock()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            # policy tokens: every row of the concatenated [chosen; rejected(; toxic)] forward
            self.clock.mark(batch.attention_mask.sum().item(), batch.index.numel())

    needs_toxic = method == "adpo"
    _, dm, tok = setup(cfg, needs_toxic)
    if needs_toxic:
        loss = partial(adpo_loss, beta=cfg.adpo_beta, gamma=cfg.adpo_gamma)
    else:
        loss = partial(dpo_loss, beta=cfg.dpo_beta)
    with tempfile.TemporaryDirectory() as tmp:
        module = Timed(model_factory(cfg), tok, partial(torch.optim.AdamW, lr=cfg.lr, weight_decay=0.0),
                       loss, needs_toxic=needs_toxic, precompute_reference=precompute,
                       cache_dir=f"{tmp}/reflogps", shared_prompt=shared)  # fmt: skip
        clock = Clock()
        trainer = L.Trainer(
            accelerator="cpu", devices=1, precision="32-true", max_steps=cfg.warmup + cfg.steps,
            gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            num_sanity_val_steps=0, callbacks=[clock], default_root_dir=tmp,
        )  # fmt: skip
        rss_start = current_rss_mb()
        trainer.fit(module, datamodule=dm)
    params = sum(p.numel() for p in module.model.parameters())
    return finish(cfg, clock.clock, sink, rss_start, params, tok)


# ---------------------------------------------------------------- TRL row
def run_trl(cfg: Config, precompute: bool) -> dict:
    import datasets
    import trl
    from transformers import TrainerCallback

    sink: dict = {}

    class Timed(trl.DPOTrainer):
        def _precompute_ref_logps(self, *args, **kwargs):
            return timed(sink, lambda: super(Timed, self)._precompute_ref_logps(*args, **kwargs))

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.clock, self.trainer, self.seen = StepClock(), None, 0

        def on_step_end(self, args, state, control, **kwargs) -> None:
            # TRL adds the policy batch's attention_mask.sum() to _total_train_tokens every step.
            total = self.trainer._total_train_tokens
            self.clock.mark(total - self.seen, args.per_device_train_batch_size)
            self.seen = total

    examples, _, tok = setup(cfg, needs_toxic=False)
    rows = [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples]
    model = model_factory(cfg)(tok)
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        args = trl.DPOConfig(
            output_dir=tmp, beta=cfg.dpo_beta, loss_type=["sigmoid"],
            per_device_train_batch_size=cfg.batch_size, max_length=cfg.max_length,
            learning_rate=cfg.lr, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
            max_grad_norm=1.0, optim="adamw_torch", max_steps=cfg.warmup + cfg.steps,
            precompute_ref_log_probs=precompute, gradient_checkpointing=False, bf16=False,
            fp16=False, use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no",
            disable_tqdm=True, dataloader_pin_memory=False, seed=cfg.seed,
        )  # fmt: skip
        rss_start = current_rss_mb()
        # ref_model=None with precompute: TRL scores the reference with the policy's initial
        # weights and keeps ONE model, like safealign; otherwise a frozen copy (ENV.md).
        trainer = Timed(
            model=model, ref_model=None if precompute else copy.deepcopy(model), args=args,
            train_dataset=datasets.Dataset.from_list(rows), processing_class=tok, callbacks=[clock],
        )  # fmt: skip
        clock.trainer = trainer
        trainer.train()
    params = sum(p.numel() for p in model.parameters())
    return finish(cfg, clock.clock, sink, rss_start, params, tok)


def finish(cfg: Config, clock: StepClock, sink: dict, rss_start: float, params: int, tok) -> dict:
    import torch

    if len(clock.marks) != cfg.warmup + cfg.steps:
        raise RuntimeError(f"ran {len(clock.marks)} steps, expected {cfg.warmup + cfg.steps}")
    return {
        **clock.summary(cfg.warmup),
        "precompute_s": sink.get("precompute_s"),
        "epoch_tokens": sum(clock.tokens),  # all steps: the same data => the same count
        "rss_start_mb": rss_start,
        "peak_rss_mb": peak_rss_mb(),
        "params": params,
        "vocab": len(tok),
        "vocab_hash": vocab_hash(tok),
        "torch_threads": torch.get_num_threads(),
    }


def child(row: str, cfg: Config) -> None:
    framework, method, precompute, shared = ROWS[row]
    if framework == "trl":
        result = run_trl(cfg, precompute)
    else:
        result = run_safealign(cfg, method, precompute, shared)
    emit_row({"row": row, "framework": framework, "method": method, "precomputed": precompute,
              "shared": shared, **result})  # fmt: skip


# ---------------------------------------------------------------- parent: compare and report
def compare(best: dict[str, dict]) -> dict[str, dict]:
    """Ratios: safealign vs the TRL row in the same reference mode; ADPO step vs DPO step."""
    out: dict[str, dict] = {}
    for name, r in best.items():
        trl_row = best.get(f"TRL DPO{'' if r['precomputed'] else ' otf'}")  # None: not run (--rows)
        mode = ("" if r["precomputed"] else " otf") + ("" if r.get("shared", True) else " unshared")
        dpo_row = best.get(f"safealign DPO{mode}")
        ratios = {}
        if r["framework"] == "safealign" and trl_row:
            ratios["pairs_per_s_vs_trl"] = r["pairs_per_s"] / trl_row["pairs_per_s"]
            ratios["tokens_per_s_vs_trl"] = r["tokens_per_s"] / trl_row["tokens_per_s"]
            ratios["pairs_per_cpu_s_vs_trl"] = r["pairs_per_cpu_s"] / trl_row["pairs_per_cpu_s"]
            ratios["peak_rss_vs_trl"] = r["peak_rss_mb"] / trl_row["peak_rss_mb"]
        if r["method"] == "adpo" and dpo_row:
            ratios["step_vs_dpo"] = r["step_ms_mean"] / dpo_row["step_ms_mean"]
            ratios["cpu_step_vs_dpo"] = r["cpu_ms_per_step"] / dpo_row["cpu_ms_per_step"]
        out[name] = ratios
    return out


# (header, "row" or "ratio", key, format)
COLUMNS = [("pairs/s", "row", "pairs_per_s", ".2f"), ("tokens/s", "row", "tokens_per_s", ",.0f"),
           ("step ms", "row", "step_ms_mean", ".0f"), ("CPU ms/step", "row", "cpu_ms_per_step", ".0f"),
           ("precompute s", "row", "precompute_s", ".2f"), ("RSS start MB", "row", "rss_start_mb", ",.0f"),
           ("peak RSS MB", "row", "peak_rss_mb", ",.0f"), ("pairs/s ×TRL", "ratio", "pairs_per_s_vs_trl", ".2f"),
           ("pairs/CPU-s ×TRL", "ratio", "pairs_per_cpu_s_vs_trl", ".2f"),
           ("peak RSS ×TRL", "ratio", "peak_rss_vs_trl", ".2f"), ("step ×DPO", "ratio", "step_vs_dpo", ".2f")]  # fmt: skip


def table(best: dict[str, dict], ratios: dict[str, dict]) -> str:
    cells = [[name] + [fmt((r if src == "row" else ratios[name]).get(key), spec)
                       for _, src, key, spec in COLUMNS] for name, r in best.items()]  # fmt: skip
    return markdown_table(["row"] + [c[0] for c in COLUMNS], cells)


def aims(ratios: dict[str, dict]) -> list[str]:
    """Issue 12's aims, judged on wall-clock ratios (CPU-time ratios alongside, for a busy box)."""
    lines = []
    for name, want, key, cpu_key in [
        ("safealign DPO", 1.5, "pairs_per_s_vs_trl", "pairs_per_cpu_s_vs_trl"),
        ("safealign DPO otf", 1.5, "pairs_per_s_vs_trl", "pairs_per_cpu_s_vs_trl"),
        ("safealign DPO", 1.0, "peak_rss_vs_trl", None),
        ("safealign DPO otf", 1.0, "peak_rss_vs_trl", None),
        ("safealign ADPO", 1.25, "step_vs_dpo", "cpu_step_vs_dpo"),
        ("safealign ADPO otf", 1.25, "step_vs_dpo", "cpu_step_vs_dpo"),
    ]:
        if key not in ratios.get(name, {}):
            continue  # a row it needs was not run (--rows)
        got, at_least = ratios[name][key], key.startswith("pairs")
        ok = got >= want if at_least else got <= want
        cpu = f" (CPU time: {ratios[name][cpu_key]:.2f})" if cpu_key else ""
        aim = f"{'>=' if at_least else '<='} {want}"
        lines.append(f"{'MET ' if ok else 'MISS'} {name}: {key} = {got:.2f}{cpu} (aim {aim})")
    return lines


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--row", choices=list(ROWS), help="internal: run one row in this process")
    p.add_argument("--config", help="internal: the parent's Config as JSON")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 steps: checks the plumbing")
    p.add_argument(
        "--rows", nargs="+", choices=list(ROWS), default=DEFAULT_ROWS, help="rows to run"
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per row (interleaved); best kept")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per row process")
    p.add_argument(
        "--max-load", type=float, help="wait for a 1-min load average below this per row"
    )
    p.add_argument("--max-wait", type=float, default=600.0, help="longest wait for --max-load (s)")
    add_dataclass_args(p, Config)
    args = p.parse_args(argv)
    if args.config:
        return args, Config(**json.loads(args.config))
    base = {**(HH if args.data == "hh" else {}), **(SMOKE if args.smoke else {})}
    return args, dataclass_from_args(args, Config, base)


def main(argv: list[str] | None = None) -> None:
    from safealign.io import write_json

    args, cfg = parse_args(argv)
    if args.row:
        return child(args.row, cfg)
    load_before, runs = load_average(), {name: [] for name in args.rows}
    extra = ["--config", json.dumps(dataclasses.asdict(cfg))]
    for rep in range(args.repeats):
        for name in args.rows[:: 1 if rep % 2 == 0 else -1]:  # alternate order: drift cancels
            load = wait_for_quiet(args.max_load, args.max_wait)
            r = {**run_row(HERE, name, extra, cfg.threads, args.timeout), "load_at_start": load}
            runs[name].append(r)
            print(f"[{rep + 1}/{args.repeats}] {name}: {r['pairs_per_s']:.2f} pairs/s, peak "
                  f"{r['peak_rss_mb']:.0f} MB (load {load})", file=sys.stderr, flush=True)  # fmt: skip
    best = best_runs(runs)
    check_same_work(best)
    ratios = compare(best)
    first = next(iter(best.values()))
    print(f"GPT-2 {cfg.n_layer}L/{cfg.n_embd}d/{cfg.n_head}h, {first['params']:,} parameters, vocab "
          f"{first['vocab']}; {cfg.batch_size} pairs/step, max_length {cfg.max_length}, fp32, "
          f"AdamW lr {cfg.lr}, {cfg.threads} threads, {cfg.steps} timed steps after {cfg.warmup} "
          f"warm-up, best of {args.repeats}; 1/5/15-min load average {_load(load_before)} -> "
          f"{_load(load_average())}")  # fmt: skip
    print(
        "otf = reference model on the fly; otherwise reference log-probs precomputed once "
        "(throughput excludes the precompute, shown in its own column)\n"
    )
    print(table(best, ratios))
    print("\n" + "\n".join(aims(ratios)))
    write_json(args.out, {"config": dataclasses.asdict(cfg), "repeats": args.repeats,
                          "load_average": [load_before, load_average()], "rows": best,
                          "ratios": ratios, "runs": runs})  # fmt: skip
    print(f"\nwrote {args.out}")


def _load(load: tuple[float, float, float] | None) -> str:
    return "n/a" if load is None else "/".join(f"{x:.2f}" for x in load)


def check_same_work(best: dict[str, dict]) -> None:
    """Every row must train the same model on the same tokens, or the ratios mean nothing."""
    for key in ("params", "vocab_hash"):
        if len({r[key] for r in best.values()}) != 1:
            raise RuntimeError(f"rows differ in {key}: {[r[key] for r in best.values()]}")
    dpo = {n: r["epoch_tokens"] for n, r in best.items() if r["method"] == "dpo"}
    if len(set(dpo.values())) > 1:
        raise RuntimeError(f"DPO rows saw different numbers of policy tokens: {dpo}")


if __name__ == "__main__":
    main()
