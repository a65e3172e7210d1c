"""Annotation of generated samples into ADPO triples (x, y_w, y_l, y_t) (METHODS.md A.2 steps 4-5).

Input: generation rows (safealign/generation.py) for the same prompt list: "normal" rows
(``toxic: false``, e.g. one sample at T=1.0 and one at T=1.5) and rows sampled with ``[TOXIC]``.
Rows are grouped by ``prompt_id``. Each prompt is kept or dropped for the FIRST failing reason in
this order (every judge, counted in ``stats["dropped"]``):

1. ``single_normal``   fewer than 2 normal samples;
2. ``empty_generation`` fewer than 2 non-empty normal samples, or (when y_t is needed) every
   toxic sample is empty;
3. ``no_safe_normal``  no normal sample is safe and non-evasive (LLM judge: answered NONE);
4. ``identical_pair``  every possible rejected text equals the chosen text;
5. ``no_toxic_sample`` / ``toxic_not_toxic``  y_t missing / not judged toxic (only with
   ``require_toxic=True``; otherwise the pair is kept with ``toxic=None``, i.e. DPO data);
6. ``invalid_judge_output``  the LLM judge's answer could not be parsed (LLM judge only).

The exact criteria of the paper's Llama-2-13B-chat judge are [NOT FOUND] (METHODS.md A.2): what
follows is the [INFERRED] reading, with every choice behind a flag.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from safealign.errors import DataError
from safealign.io import write_json, write_jsonl
from safealign.pipeline.llm_verdict import LLMJudge, hf_generate_fn, parse_verdict
from safealign.types import PreferenceExample

__all__ = ["REASONS", "ClassifierJudge", "LLMJudge", "hf_generate_fn", "parse_verdict",
           "group_rows", "load_judgements", "save_judgements", "select_triple"]
