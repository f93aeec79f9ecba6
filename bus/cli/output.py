"""How the admin commands print: rich tables for people, JSON (camelCase) for scripts."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

import msgspec


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = max(console.width, 160)  # piped: long lines grep better than folded cells
    return console


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(msgspec.to_builtins(value), indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def size_text(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover


def ms_text(at: int) -> str:
    return datetime.fromtimestamp(at / 1000, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if at else "-"


def table(title: str | None, columns: list[str], rows: list[list[Any]], *, no_wrap: tuple[int, ...] = (0,)) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    for i, col in enumerate(columns):
        table.add_column(col, no_wrap=i in no_wrap, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console().print(table)


def fields_table(title: str, value: msgspec.Struct) -> None:
    """Every non-null field of a record, one per row, under its wire (camelCase) name."""
    data = msgspec.to_builtins(value)
    rows = [[k, json.dumps(v) if isinstance(v, (dict, list, tuple)) else v] for k, v in data.items() if v is not None]
    table(title, ["field", "value"], rows)
