"""What every bench side reports (:class:`Run`) and the statistics the report is made of:
medians, percentiles and ratios (shared by bench_bus.py and its peers)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def percentile(xs: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass
class Run:
    """One generation as a client saw it (times in seconds)."""

    side: str
    ttft_s: float
    tokens: int
    finish: str
    t0: float
    t_first: float
    t_last: float
    text: str
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    engine_tps: float | None = None
    engine_ttft_ms: float | None = None
    pre_engine_ms: float | None = None
    started_ms: float | None = None
    token_messages: int | None = None

    def tps(self, n: int) -> float | None:
        """Decode rate after the first token, only for a run that reached ``n`` tokens."""
        if self.tokens != n or self.finish != "length" or n < 2 or self.t_last <= self.t_first:
            return None
        return (n - 1) / (self.t_last - self.t_first)
