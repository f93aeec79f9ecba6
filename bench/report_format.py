"""How benchmark figures are written in the reports."""

from __future__ import annotations

from typing import Any


def n(x: Any, spec: str = ".1f") -> str:
    """``x`` formatted with ``spec``, or ``n/a`` when it was not measured."""
    return "n/a" if not isinstance(x, (int, float)) else format(x, spec)
