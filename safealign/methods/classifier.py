"""ClassifierModule: ISAAC's safety classifier (docs/methods.md B.7), and the scorer that reads it back.

A sequence classifier over ``"<|user|>" + context + "<|system|>" + response`` (LAST ``max_length``
tokens), 2 classes, 1 = unsafe, cross-entropy loss; the authors fine-tune RoBERTa-base on
DiaSafety train (80.88% test accuracy reported). The run ends by scoring the test split and
writing ``classifier_input.json`` next to the exported weights, which
:class:`SafetyClassifierScorer` reads so evaluation encodes exactly like training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAccuracy, BinaryF1Score
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_f1_score,
    binary_precision,
    binary_recall,
)

from safealign.data.classify import classifier_context
from safealign.errors import ConfigError
from safealign.eval.scorers import HFClassifierScorer
from safealign.io import write_json
from safealign.methods.base import BaseModule
from safealign.types import DialogueExample
from safealign.utils import rank_zero

log = logging.getLogger(__name__)
SETTINGS_FILE = "classifier_input.json"


def binary_report(preds: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict[str, float]:
    """Accuracy and unsafe-class precision/recall/F1 of 0/1 predictions, Shape: (N,) each."""
    return {
        f"{prefix}/acc": float(binary_accuracy(preds, labels)),
        f"{prefix}/precision": float(binary_precision(preds, labels)),
        f"{prefix}/recall": float(binary_recall(preds, labels)),
        f"{prefix}/f1": float(binary_f1_score(preds, labels)),
        f"{prefix}/n": float(labels.numel()),
        f"{prefix}/unsafe_rate_true": float(labels.float().mean()),
        f"{prefix}/unsafe_rate_pred": float(preds.float().mean()),  # 1 - B.7's safety score
    }


class ClassifierModule(BaseModule):
    """Cross-entropy on class logits; labels 1 = unsafe, 0 = safe (B.7). Logs val/acc, val/f1
    (unsafe class); summarize() scores the test split (test/acc, test/f1, ...)."""

    record_type = DialogueExample

    def __init__(self, model_factory: Callable, tokenizer, optimizer: Callable, scheduler=None):
        super().__init__(model_factory, tokenizer, optimizer, scheduler)
        self.cls_metrics = torch.nn.ModuleDict(
            {
                f"{s}_{m}": cls()
                for s in ("val", "test")
                for m, cls in (("acc", BinaryAccuracy), ("f1", BinaryF1Score))
            }
        )

    def logits(self, batch: dict) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits  # (B, 2)

    def _step(self, batch: dict, split: str, batch_idx: int) -> torch.Tensor:
        logits = self.logits(batch)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        self.check_finite(loss, batch["index"], batch_idx)
        bs = batch["labels"].numel()
        self.log_split(split, {"loss": loss}, batch_size=bs)
        preds = logits.argmax(-1)
        if split == "train":
            self.log_split(split, {"acc": (preds == batch["labels"]).float().mean()}, bs)
            return loss
        for name in ("acc", "f1"):  # torchmetrics objects: they sync their own state over ranks
            metric = self.cls_metrics[f"{split}_{name}"]
            metric(preds, batch["labels"])
            self.log(
                f"{split}/{name}", metric, prog_bar=name == "acc", batch_size=bs, on_epoch=True
            )
        return loss

    @torch.no_grad()  # not inference_mode: FSDP2 writes its all-gather buffers in place
    def predict_loader(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions, labels) over a loader, model in eval mode. Shape: (N,) each."""
        was_training = self.model.training
        self.model.eval()
        preds, labels = [], []
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            preds.append(self.logits(batch).argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
        self.model.train(was_training)
        return torch.cat(preds), torch.cat(labels)

    def export(self, out_dir: str | Path) -> Path:
        """save_pretrained (safetensors) + tokenizer + the input settings scorers need."""
        path = super().export(out_dir)
        datamodule = getattr(self._trainer, "datamodule", None)
        if hasattr(datamodule, "input_settings") and rank_zero():  # export is collective
            write_json(path / SETTINGS_FILE, datamodule.input_settings())
        return path

    def summarize(self, datamodule, out_dir) -> dict[str, float]:
        """Test-split metrics of the final weights (run.py fits but does not call trainer.test)."""
        if not datamodule.indexed_rows("test"):
            return {}
        preds, labels = self.predict_loader(datamodule.test_dataloader())
        return binary_report(preds, labels, "test")


def read_settings(path: str | Path) -> dict:
    """The input settings a ClassifierModule run wrote next to its exported model."""
    f = Path(path) / SETTINGS_FILE
    if not f.is_file():
        raise ConfigError("path", f"no {SETTINGS_FILE} in {path}: not a method=classifier export")
    try:
        settings = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError("path", f"{f}: invalid JSON ({e})") from e
    missing = {"input_template", "max_length", "add_special_tokens", "unsafe_label"} - set(settings)
    if missing:
        raise ConfigError("path", f"{f}: missing keys {sorted(missing)}")
    return settings


class SafetyClassifierScorer(HFClassifierScorer):
    """HFClassifierScorer for a ``method=classifier`` export: takes the input template, length,
    special tokens and unsafe label from ``classifier_input.json`` and turns project-format
    contexts (``"\\n\\nHuman: ...\\n\\nAssistant:"``) into the classifier's raw form (B.7)."""

    def __init__(
        self, path: str, batch_size: int = 32, device: str = "cpu", name: str = "safety_classifier"
    ) -> None:
        s = read_settings(path)
        super().__init__(
            path, unsafe_label=int(s["unsafe_label"]), batch_size=batch_size,
            max_length=int(s["max_length"]), input_template=s["input_template"],
            truncation_side=s.get("truncation_side", "left"),
            add_special_tokens=bool(s["add_special_tokens"]), device=device, name=name,
        )  # fmt: skip

    def score(self, responses: list[str], contexts: list[str] | None = None) -> np.ndarray:
        ctx = None if contexts is None else [classifier_context(c) for c in contexts]
        return super().score([r.strip() for r in responses], ctx)
