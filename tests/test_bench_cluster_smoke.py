"""python -m bench.bench_cluster --quick runs end to end and writes every figure (no timing is asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.model]

ROOT = Path(__file__).resolve().parent.parent


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_quick_cluster_bench_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    proc = subprocess.run([sys.executable, "-m", "bench.bench_cluster", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    one, fail = results["oneStream"], results["failover"]
    for key in ("soloTokPerS", "pairTokPerS", "pairOverSolo", "pairedRatioMedian", "soloTtft", "pairTtft"):
        assert _positive(one[key]), key
    assert {r["node"] for r in one["runs"]["pair"]} == {"a"}  # the pair's topic is node a's
    assert _positive(fail["killToFirstTokenElsewhere"])
    assert [r["answeredBy"] for r in fail["runs"]] == ["b"]  # the killed node's reply came from the other
    from bench.bench_cluster import markdown

    assert "## 6. Several nodes" in markdown(results)
