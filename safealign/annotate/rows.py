"""Generation rows in, judged triples out: the row schema and the triples files on disk.

Input rows come from :func:`safealign.generation.generate` for one prompt list: "normal" rows
(``toxic: false``, e.g. one sample at T=1.0 and one at T=1.5) and rows sampled with ``[TOXIC]``,
grouped by ``prompt_id``. Output: triples as JSONL with ``<stem>.stats.json`` (and optionally the
judge's per-prompt ``<stem>.records.jsonl``) beside them, every file written atomically.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safealign.errors import DataError
from safealign.io import write_json, write_jsonl
from safealign.types import PreferenceExample

ROW_KEYS = ("prompt_id", "prompt", "response", "temperature", "sample", "toxic", "empty")
Groups = dict[int, tuple[str, list[dict], list[dict]]]


def group_rows(rows: list[dict]) -> Groups:
    """prompt_id -> (prompt, normal rows, toxic rows), each sorted by (temperature, sample)."""
    groups: Groups = {}
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
