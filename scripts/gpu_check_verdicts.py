"""Verdicts of scripts/gpu_check.py: pure functions of one cell's finished run dir.

A cell fails on a non-zero exit, a time-out, a step-0 |KL| (policy vs cached reference, chosen
and rejected) above KL_TOL, or an export that does not load or whose tensors differ in name or
shape from a freshly built model=tiny_llama (0-element tensors included, what a rank-0 save of a
ZeRO-3 partitioned parameter writes). `table` renders the rows as the script's markdown report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"
KL_TOL = 1e-2


@dataclass(frozen=True)
class Cell:
    strategy: str
    method: str

    @property
    def name(self) -> str:
        return f"{self.strategy}/{self.method}"


@dataclass
class Row:
    cell: Cell
    kl: float | None = None
    loss: float | None = None
    export: str = "-"
    tokens_per_s: float | None = None
    peak_mem_gb: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def expected_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a freshly built model=tiny_llama with the exported tokenizer."""
    from omegaconf import OmegaConf

    from safealign.models import build_tiny_llama, load_tokenizer

    lm = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "tiny_llama.yaml").lm)
    kwargs = {k: v for k, v in lm.items() if k not in ("_target_", "_partial_", "seed")}
    model = build_tiny_llama(load_tokenizer(str(model_dir), require_model=False), **kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_export(model_dir: Path, expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Problems with an exported model dir (empty list = OK): safetensors present, no 0-element
    tensor, the same names and shapes as `expected`, and transformers loads it."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return [f"no *.safetensors in {model_dir}"]
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    problems = []
    empty = sorted(k for k, s in shapes.items() if math.prod(s) == 0)
    if empty:
        problems.append(f"0-element tensors: {', '.join(empty[:3])}")
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or extra:
        problems.append(f"tensor names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    wrong = sorted(k for k in set(shapes) & set(expected) if shapes[k] != expected[k])
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} shapes differ, e.g. {k}: {shapes[k]} != {expected[k]}")
    if not problems:
        try:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as e:  # any load failure is the verdict, not a crash of the check
            problems.append(f"does not load: {type(e).__name__}: {e}"[:200])
    return problems


def judge(cell: Cell, run_dir: Path, returncode: int | None, expected_fn=expected_shapes) -> Row:
    """The table row of one finished cell; `returncode` None means it timed out."""
    row = Row(cell)
    if returncode is None:
        row.problems.append("timed out")
    elif returncode != 0:
        row.problems.append(f"exit status {returncode}")
    history = run_dir / "history.jsonl"
    rows = read_jsonl(history) if history.exists() else []
    if not rows:
        row.problems.append("no history.jsonl rows")
        return row
    first, last = rows[0], rows[-1]
    if cell.method != "sft":
        kls = [first.get(f"train/kl/{k}_step") for k in ("chosen", "rejected")]
        if None in kls:
            row.problems.append("no train/kl/{chosen,rejected}_step in the first history row")
        else:
            row.kl = max(abs(v) for v in kls)
            if not row.kl <= KL_TOL:  # NaN fails too
                row.problems.append(f"step-0 |KL| {row.kl:.3g} > {KL_TOL:g}")
    row.loss = last.get("train/loss_step", last.get("train/loss"))
    if row.loss is None or not math.isfinite(row.loss):
        row.problems.append(f"final loss {row.loss}")
    model_dir = run_dir / "model"
    export = (
        check_export(model_dir, expected_fn(model_dir)) if model_dir.is_dir() else ["no model/"]
    )
    row.export = "ok" if not export else "FAIL"
    row.problems += export
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    row.tokens_per_s = metrics.get("perf/tokens_per_s")
    row.peak_mem_gb = metrics.get("perf/peak_mem_gb")
    return row


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[Row]) -> str:
    head = (
        "| strategy | method | step-0 KL | final loss | export | tokens/s | peak mem GB | result |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = "n/a" if r.cell.method == "sft" else _fmt(r.kl, ".1e")
        result = "ok" if r.ok else "FAIL: " + "; ".join(r.problems)
        lines.append(
            f"| {r.cell.strategy} | {r.cell.method} | {kl} | {_fmt(r.loss, '.4f')} | {r.export}"
            f" | {_fmt(r.tokens_per_s, ',.0f')} | {_fmt(r.peak_mem_gb, '.3f')} | {result} |"
        )
    return "\n".join(lines)
