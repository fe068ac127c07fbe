"""Plain-text tables for the admin commands: a header row, columns as wide as their widest cell."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["format_table"]


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, empty: str = "-") -> str:
    """The rows under their headers, columns separated by two spaces; an empty cell shows as ``empty``."""
    lines = [tuple(headers), *(tuple(cell or empty for cell in row) for row in rows)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )
