"""Annotation of generated samples into ADPO triples (x, y_w, y_l, y_t) (METHODS.md A.2 steps 4-5).

Input: generation rows (safealign/generation.py) for one prompt list: "normal" rows
(``toxic: false``, e.g. one sample at T=1.0 and one at T=1.5) and rows sampled with ``[TOXIC]``,
grouped by ``prompt_id``. A prompt is dropped for the FIRST failing reason in this order (both
judges; counted in ``stats["dropped"]``):

1. ``single_normal``    fewer than 2 normal samples;
2. ``empty_generation`` fewer than 2 non-empty normal samples, or (when y_t is needed) every
   toxic sample is empty;
3. ``no_safe_normal``   no normal sample is safe and non-evasive (LLM judge: it answered NONE);
4. ``identical_pair``   every possible rejected text equals the chosen text;
5. ``no_toxic_sample`` / ``toxic_not_toxic``  y_t missing / not judged toxic; only with
   ``require_toxic=True`` (METHODS.md A.2: drop the triple), else kept with ``toxic=None``;
6. ``invalid_judge_output``  the LLM judge's answer could not be parsed (LLM judge only).

The paper's Llama-2-13B-chat prompts and criteria are [NOT FOUND] (METHODS.md A.2): what follows
is the [INFERRED] reading, every choice behind a flag. Judge logic is pure given scorer outputs.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from safealign.errors import ConfigError, DataError
from safealign.io import stable_hash, write_json, write_jsonl
from safealign.types import PreferenceExample

REASONS = (
    "single_normal",
    "empty_generation",
    "no_safe_normal",
    "identical_pair",
    "no_toxic_sample",
    "toxic_not_toxic",
    "invalid_judge_output",
)
ROW_KEYS = ("prompt_id", "prompt", "response", "temperature", "sample", "toxic", "empty")
EVASIVE_AT = 0.5  # evasiveness scorers return 0/1; >= 0.5 counts as evasive


@dataclass(frozen=True)
class Candidate:
    """One generated sample with its scores (NaN = not scored: never safe, never toxic)."""

    text: str
    temperature: float
    sample: int
    empty: bool
    tox: float = math.nan
    evasive: float = math.nan
    coherence: float = math.nan


def group_rows(rows: list[dict]) -> dict[int, tuple[str, list[dict], list[dict]]]:
    """prompt_id -> (prompt, normal rows, toxic rows), each sorted by (temperature, sample)."""
    groups: dict[int, tuple[str, list[dict], list[dict]]] = {}
    for i, row in enumerate(rows):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise DataError("generation rows", f"row {i} lacks keys {missing}")
        prompt, normal, toxic = groups.setdefault(row["prompt_id"], (row["prompt"], [], []))
        if row["prompt"] != prompt:
            raise DataError(
                "generation rows", f"row {i}: prompt_id {row['prompt_id']} has two prompts"
            )
        (toxic if row["toxic"] else normal).append(row)
    for _, normal, toxic in groups.values():
        for part in (normal, toxic):
            part.sort(key=lambda r: (r["temperature"], r["sample"]))
    return groups


def _acceptable(c: Candidate, threshold: float) -> bool:
    return c.tox < threshold and c.evasive < EVASIVE_AT  # NaN compares False: not acceptable


def _rank(c: Candidate, threshold: float, higher: bool) -> tuple:
    # Best first: acceptable, most coherent, least toxic, lowest temperature (METHODS.md A.2).
    coh = -c.coherence if higher else c.coherence
    tox = c.tox if not math.isnan(c.tox) else math.inf
    return (
        not _acceptable(c, threshold),
        coh if not math.isnan(coh) else math.inf,
        tox,
        c.temperature,
        c.sample,
    )


def _most_toxic(cands: list[Candidate], threshold: float) -> Candidate | None:
    hits = [c for c in cands if not c.empty and c.tox >= threshold]
    return min(hits, key=lambda c: (-c.tox, c.temperature, c.sample)) if hits else None


def select_triple(
    prompt: str,
    normals: list[Candidate],
    toxics: list[Candidate],
    *,
    threshold: float = 0.5,
    coherence_higher_is_better: bool = True,
    require_toxic: bool = True,
    relabel_toxic_normal: bool = False,
    source: str = "adpo_judge",
) -> tuple[PreferenceExample | None, str | None, bool]:
    """Pick (y_w, y_l, y_t) for one prompt from scored candidates (order of reasons: module doc).

    Chosen = best acceptable normal by :func:`_rank`; rejected = the worst other normal whose text
    differs; y_t = the most toxic non-empty ``[TOXIC]`` sample with tox >= threshold. With
    ``relabel_toxic_normal`` and no toxic y_t, the most toxic non-chosen normal is used as y_t
    (METHODS.md A.2 "or else re-label it as y_t"); it may also remain y_l.

    Returns:
        (triple or None, drop reason or None, relabelled).
    """
    if len(normals) < 2:
        return None, "single_normal", False
    live = [c for c in normals if not c.empty]
    if len(live) < 2:
        return None, "empty_generation", False
    ranked = sorted(live, key=lambda c: _rank(c, threshold, coherence_higher_is_better))
    chosen = ranked[0]
    if not _acceptable(chosen, threshold):
        return None, "no_safe_normal", False
    rejected = next(
        (c for c in reversed(ranked[1:]) if c.text.strip() != chosen.text.strip()), None
    )
    if rejected is None:
        return None, "identical_pair", False
    y_t, relabelled = _most_toxic(toxics, threshold), False
    if y_t is None and relabel_toxic_normal:
        y_t = _most_toxic([c for c in live if c is not chosen], threshold)
        relabelled = y_t is not None
    if y_t is None and require_toxic:
        if not toxics:
            return None, "no_toxic_sample", False
        return (
            None,
            "empty_generation" if all(c.empty for c in toxics) else "toxic_not_toxic",
            False,
        )
    toxic_text = y_t.text if y_t is not None else None
    return (
        PreferenceExample(prompt, chosen.text, rejected.text, toxic_text, source),
        None,
        relabelled,
    )


def _label(c: Candidate, threshold: float) -> str:
    if c.empty:
        return "empty"
    if math.isnan(c.tox):
        return "unscored"
    if c.tox >= threshold:
        return "toxic"
    return "evasive" if c.evasive >= EVASIVE_AT else "safe"


def _new_stats() -> dict:
    return {
        "prompts": 0,
        "kept": 0,
        "dropped": dict.fromkeys(REASONS, 0),
        "relabelled": 0,
        "invalid": 0,
        "labels": {"normal": Counter(), "toxic": Counter()},
    }


def _finish_stats(stats: dict) -> dict:
    stats["labels"] = {k: dict(sorted(v.items())) for k, v in stats["labels"].items()}
    return stats


def _scores(scorer, texts: list[str], contexts: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros(0)
    out = np.asarray(scorer.score(texts, contexts), dtype=float).reshape(-1)
    if out.shape != (len(texts),):
        name = getattr(scorer, "name", type(scorer).__name__)
        raise ValueError(
            f"scorer {name!r} returned {out.shape[0]} scores for {len(texts)} responses"
        )
    return out


class ClassifierJudge:
    """Scorer-based annotation (METHODS.md A.2 step 4, classifier variant).

    Args:
        toxicity, evasiveness, coherence: ``Scorer`` objects (safealign/eval/scorers.py);
            ``coherence=None`` ranks acceptable normals by toxicity, then temperature.
        coherence_higher_is_better: None -> the scorer's ``higher_is_better`` attribute if it has
            one, else False for ``LMCoherenceScorer`` (its score is a mean NLL: the most coherent
            sample has the LOWEST score) and True otherwise (e.g. embedding cosine similarity).
    """

    def __init__(
        self,
        toxicity,
        evasiveness,
        coherence=None,
        toxicity_threshold: float = 0.5,
        coherence_higher_is_better: bool | None = None,
        require_toxic: bool = True,
        relabel_toxic_normal: bool = False,
        source: str = "adpo_classifier_judge",
    ):
        if not 0.0 < toxicity_threshold <= 1.0:
            raise ConfigError(
                "judge.toxicity_threshold", f"need 0 < t <= 1, got {toxicity_threshold}"
            )
        self.toxicity, self.evasiveness, self.coherence = toxicity, evasiveness, coherence
        self.threshold, self.require_toxic = toxicity_threshold, require_toxic
        self.relabel, self.source = relabel_toxic_normal, source
        if coherence_higher_is_better is None:
            coherence_higher_is_better = getattr(
                coherence, "higher_is_better", type(coherence).__name__ != "LMCoherenceScorer"
            )
        self.higher = bool(coherence_higher_is_better)
        self.records: list[dict] = []  # per-prompt audit trail of the last annotate() call

    def _candidates(self, groups) -> dict[int, tuple[list[Candidate], list[Candidate]]]:
        flat = [(pid, r) for pid, (_, n, t) in groups.items() for r in n + t if not r["empty"]]
        texts, ctxs = [r["response"] for _, r in flat], [r["prompt"] for _, r in flat]
        tox = _scores(self.toxicity, texts, ctxs)
        eva = _scores(self.evasiveness, texts, ctxs)
        # Coherence for normal samples only: the LM scorer is costly and y_t never needs it.
        normal_idx = [i for i, (_, r) in enumerate(flat) if not r["toxic"]]
        coh = np.full(len(flat), math.nan)
        if self.coherence is not None:
            coh[normal_idx] = _scores(
                self.coherence, [texts[i] for i in normal_idx], [ctxs[i] for i in normal_idx]
            )
        else:
            coh[normal_idx] = 0.0  # all equal: the ranking falls through to toxicity, temperature
        scored = {id(r): (tox[i], eva[i], coh[i]) for i, (_, r) in enumerate(flat)}

        def cand(r: dict) -> Candidate:
            s = scored.get(id(r), (math.nan,) * 3)
            return Candidate(
                r["response"], r["temperature"], r["sample"], r["empty"], *map(float, s)
            )

        return {
            pid: ([cand(r) for r in n], [cand(r) for r in t]) for pid, (_, n, t) in groups.items()
        }

    def annotate(self, rows: list[dict]) -> tuple[list[PreferenceExample], dict]:
        """Rows -> (triples, stats); also fills ``self.records`` (scores, decision per prompt)."""
        groups = group_rows(rows)
        cands = self._candidates(groups)
        triples, stats, self.records = [], _new_stats(), []
        for pid in sorted(groups):
            normals, toxics = cands[pid]
            triple, reason, relabelled = select_triple(
                groups[pid][0],
                normals,
                toxics,
                threshold=self.threshold,
                coherence_higher_is_better=self.higher,
                require_toxic=self.require_toxic,
                relabel_toxic_normal=self.relabel,
                source=self.source,
            )
            stats["prompts"] += 1
            for kind, cs in (("normal", normals), ("toxic", toxics)):
                stats["labels"][kind].update(_label(c, self.threshold) for c in cs)
            _tally(stats, triples, triple, reason)
            stats["relabelled"] += relabelled
            self.records.append(
                {
                    "prompt_id": pid,
                    "decision": reason or "kept",
                    "candidates": [
                        {k: _json_num(v) for k, v in asdict(c).items()}
                        | {"toxic_ctx": kind == "toxic"}
                        for kind, cs in (("normal", normals), ("toxic", toxics))
                        for c in cs
                    ],
                }
            )
        return triples, _finish_stats(stats)

    __call__ = annotate


def _tally(
    stats: dict, triples: list, triple: PreferenceExample | None, reason: str | None
) -> None:
    if triple is not None:
        triples.append(triple)
        stats["kept"] += 1
    else:
        stats["dropped"][reason] += 1


def _json_num(v):
    return None if isinstance(v, float) and math.isnan(v) else v


# ---------------------------------------------------------------------------------------------
# LLM judge (METHODS.md A.2 step 4 with a local chat model; the paper used Llama-2-13B-chat)

DEFAULT_TEMPLATE = """You are annotating replies of a dialogue assistant.

Dialogue:{prompt}

Response A:{a}

Response B:{b}

Response C:{c}

Question 1: Which of A and B is the better reply, i.e. helpful, harmless, coherent and not \
evasive? Answer NONE if both are harmful or evasive.
Question 2: Is Response C toxic (offensive, harmful or unsafe)?
Reply with one line in exactly this format: BETTER: <A, B or NONE>; TOXIC: <yes or no>
"""

# Rejects an echoed alternative list ("A|B", "yes/no", "A or B", "A, B").
_ALT = (
    r"""(?!\s*[)\]"'”]?\s*(?:\||/|\bor\b|,)\s*[(\["'“]?\s*"""
    r"""(?:a|b|none|yes|no|true|false)\b)"""
)
# Case-insensitive labels; a lowercase "a" followed by a word is the article, not the answer.
_BETTER = re.compile(
    r"""(?<![a-z])better(?:\s+(?:reply|response))?\s*(?:is\s*)?[:=\-–]?\s*"""
    r"""(?:is\s+)?(?:response\s+|reply\s+|option\s+)?[(\["'“]?\s*"""
    r"""(?P<v>none|b|(?-i:A)|(?-i:a)(?![ \t]+[a-z]))\b""" + _ALT,
    re.I,
)
_TOXIC = re.compile(
    r"""(?<![\w-])toxic(?:ity)?\s*[:=\-–?]?\s*(?:is\s+)?[(\["'“]?\s*"""
    r"""(?P<v>yes|no|true|false)\b""" + _ALT,
    re.I,
)


def _unique(pattern: re.Pattern, text: str) -> str | None:
    values = {m.group("v").upper() for m in pattern.finditer(text)}
    values = {"YES" if v == "TRUE" else "NO" if v == "FALSE" else v for v in values}
    return values.pop() if len(values) == 1 else None  # none or conflicting -> invalid


def parse_verdict(text: str) -> tuple[str | None, bool | None]:
    """Parse ``"BETTER: A|B|NONE; TOXIC: yes|no"`` robustly (case, markdown, extra prose).

    Returns:
        (better in {"A", "B", "NONE"} or None, toxic or None); None = missing or ambiguous.
    """
    clean = re.sub(r"[*_`#>]", " ", text)  # markdown emphasis / code / headings / quotes
    better, toxic = _unique(_BETTER, clean), _unique(_TOXIC, clean)
    return better, None if toxic is None else toxic == "YES"


class LLMJudge:
    """Annotation by a local chat model behind ``generate_fn`` (list of prompts -> list of replies).

    A = one normal sample, B = the other (the first two non-empty normals by temperature, sample);
    their order is swapped for a seeded half of the prompts, so a judge's position bias cannot
    favour one temperature. C = the first non-empty ``[TOXIC]`` sample. Raw replies and parsed
    verdicts are kept in ``self.records`` (METHODS.md A.2: log the judge outputs). Reasons that
    need no judge (single_normal, empty_generation, identical_pair, no_toxic_sample) are decided
    first and those prompts are never sent; then invalid_judge_output, no_safe_normal (NONE),
    toxic_not_toxic.
    """

    def __init__(
        self,
        generate_fn: Callable[[list[str]], list[str]],
        template: str = DEFAULT_TEMPLATE,
        require_toxic: bool = True,
        randomize_order: bool = True,
        seed: int = 0,
        source: str = "adpo_llm_judge",
    ):
        try:
            template.format(prompt="x", a="y", b="z", c="w")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                "judge.template", f"must use only {{prompt}} {{a}} {{b}} {{c}}: {e!r}"
            ) from e
        self.generate_fn, self.template, self.require_toxic = generate_fn, template, require_toxic
        self.randomize, self.seed, self.source = randomize_order, seed, source
        self.records: list[dict] = []

    def _pre(self, normal: list[dict], toxic: list[dict]) -> tuple[str | None, tuple]:
        """Drop reasons decidable before asking the judge; else (None, (a, b, c_or_None))."""
        if len(normal) < 2:
            return "single_normal", ()
        live = [r for r in normal if not r["empty"]]
        if len(live) < 2:
            return "empty_generation", ()
        if live[0]["response"].strip() == live[1]["response"].strip():
            return "identical_pair", ()
        c = next((r for r in toxic if not r["empty"]), None)
        if c is None and self.require_toxic:
            return ("empty_generation" if toxic else "no_toxic_sample"), ()
        return None, (live[0], live[1], c)

    def annotate(self, rows: list[dict]) -> tuple[list[PreferenceExample], dict]:
        """Rows -> (triples, stats); ``stats["invalid"]`` counts unparseable judge replies."""
        groups = group_rows(rows)
        stats, triples, asks = _new_stats(), [], {}
        for pid in sorted(groups):
            prompt, normal, toxic = groups[pid]
            stats["prompts"] += 1
            stats["labels"]["normal"].update("empty" for r in normal if r["empty"])
            stats["labels"]["toxic"].update("empty" for r in toxic if r["empty"])
            reason, picked = self._pre(normal, toxic)
            if reason:
                stats["dropped"][reason] += 1
                continue
            a, b, c = picked
            if self.randomize and int(stable_hash(self.seed, pid), 16) % 2:
                a, b = b, a
            asks[pid] = (a, b, c)
        prompts = [
            self.template.format(
                prompt=groups[p][0],
                a=a["response"],
                b=b["response"],
                c=c["response"] if c else " (none)",
            )
            for p, (a, b, c) in asks.items()
        ]
        replies = list(self.generate_fn(prompts)) if prompts else []
        if len(replies) != len(prompts):
            raise ValueError(
                f"judge generate_fn returned {len(replies)} replies for {len(prompts)} prompts"
            )
        self.records = []
        for (pid, (a, b, c)), reply in zip(asks.items(), replies, strict=True):
            better, is_toxic = parse_verdict(reply)
            reason = _verdict_reason(better, is_toxic, c is not None, self.require_toxic)
            stats["invalid"] += reason == "invalid_judge_output"
            if c is not None and is_toxic is not None:
                stats["labels"]["toxic"]["toxic" if is_toxic else "not_toxic"] += 1
            triple = None
            if reason is None:
                win, lose = (a, b) if better == "A" else (b, a)
                y_t = c["response"] if c is not None and is_toxic else None
                triple = PreferenceExample(
                    groups[pid][0], win["response"], lose["response"], y_t, self.source
                )
            _tally(stats, triples, triple, reason)
            self.records.append(
                {
                    "prompt_id": pid,
                    "reply": reply,
                    "better": better,
                    "toxic": is_toxic,
                    "decision": reason or "kept",
                    "a": [a["temperature"], a["sample"]],
                    "b": [b["temperature"], b["sample"]],
                }
            )
        return triples, _finish_stats(stats)

    __call__ = annotate


def _verdict_reason(
    better: str | None, toxic: bool | None, has_c: bool, require: bool
) -> str | None:
    if better is None or (has_c and toxic is None):
        return "invalid_judge_output"
    if better == "NONE":
        return "no_safe_normal"
    if require and not toxic:
        return "toxic_not_toxic"
    return None


def hf_generate_fn(
    model,
    tokenizer,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    chat_template: bool | None = None,
    progress: bool = False,
) -> Callable[[list[str]], list[str]]:
    """A greedy ``generate_fn`` for :class:`LLMJudge` over a local HF model (safealign.generation).

    ``chat_template``: None = use the tokenizer's template when it has one; True = require one;
    False = feed the raw judge prompt. Templated, each judge prompt is ONE user turn (it quotes
    the dialogue, chat tags and all, so it is not parsed into turns), rendered by
    :func:`safealign.data.chat.render_prompt`; the template then supplies BOS itself.
    """
    from safealign.data.chat import has_template, render_prompt
    from safealign.generation import SamplingConfig, generate

    if chat_template and not has_template(tokenizer):
        raise ConfigError("judge.chat_template", "the judge tokenizer has no chat template")
    templated = has_template(tokenizer) if chat_template is None else chat_template
    sampling = SamplingConfig(
        temperatures=(0.0,), n_samples=1, max_new_tokens=max_new_tokens, batch_size=batch_size
    )

    def fn(prompts: list[str]) -> list[str]:
        texts = [
            render_prompt(tokenizer, [{"role": "user", "content": p}]) if templated else p
            for p in prompts
        ]
        rows = generate(
            model,
            tokenizer,
            texts,
            sampling,
            seed=0,
            progress=progress,
            add_special_tokens=not templated,
            render=False,
        )
        return [r["response"].strip() for r in rows]

    return fn


def _side_paths(path: Path) -> tuple[Path, Path]:
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(f"{stem}.stats.json"), path.with_name(f"{stem}.records.jsonl")


def save_judgements(
    path: str | Path,
    triples: list[PreferenceExample],
    stats: dict,
    records: list[dict] | None = None,
) -> None:
    """Triples as JSONL at ``path``; stats (and optional judge records) beside it. All atomic."""
    path = Path(path)
    stats_path, records_path = _side_paths(path)
    if records is not None:
        write_jsonl(records_path, records)
    write_json(stats_path, stats)
    write_jsonl(path, [asdict(t) for t in triples])  # last: its presence means a complete set


def load_judgements(path: str | Path) -> tuple[list[PreferenceExample], dict]:
    """Read what :func:`save_judgements` wrote; malformed lines raise DataError with the line."""
    path = Path(path)
    stats_path, _ = _side_paths(path)
    if not path.exists() or not stats_path.exists():
        raise DataError(path, f"missing judgements file or its stats file {stats_path.name}")
    triples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
            ok = all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected"))
            ok = ok and (row.get("toxic") is None or isinstance(row["toxic"], str))
        except (json.JSONDecodeError, AttributeError) as e:
            raise DataError(path, f"not a JSON object: {e}", line=n) from e
        if not ok:
            raise DataError(
                path, "expected string prompt/chosen/rejected and toxic string|null", line=n
            )
        triples.append(
            PreferenceExample(
                row["prompt"],
                row["chosen"],
                row["rejected"],
                row.get("toxic"),
                row.get("source", ""),
            )
        )
    return triples, json.loads(stats_path.read_text(encoding="utf-8"))
