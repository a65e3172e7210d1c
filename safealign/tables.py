"""The one markdown table writer: evaluation tables, pipeline and demo summaries, the multirun
and ISAAC reports all draw with :func:`markdown_table` (cells formatted by the caller)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def _line(cells: Iterable[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_table(header: Sequence[str], rows: Iterable[Iterable[object]]) -> str:
    """A GitHub markdown table (no trailing newline): the header, a ``|---|`` rule, one line per
    row. Cells are ``str()``-ed: format numbers before (each table has its own precision)."""
    lines = [_line(header), "|" + "---|" * len(header)]
    lines += [_line(row) for row in rows]
    return "\n".join(lines)
