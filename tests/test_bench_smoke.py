"""The benchmark suite's quick mode runs end to end and writes every figure (no timing is asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parent.parent

POSITIVE = (
    "bus_over_direct_tps",
    "bus_over_raw_tps",
    "turn20_over_turn1_ttft",
    "turn20_ttft_bus_over_direct_reuse",
    "turn20_over_turn1_ttft_no_reuse",
    "registry_append_eps",
    "registry_rebuild_100k_s",
    "rss_mb_1_topic",
    "rss_mb_8_topics",
    "batched8_over_raw_batched8",
)


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.timeout(900)  # minutes of model work; 2 to 3 on a busy 2-core machine
def test_quick_bench_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out-dir", str(out), "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    # On a native abort ggml appends a gdb backtrace; keep the benchmark's own progress lines readable.
    progress = [line for line in proc.stdout.splitlines() if not line.startswith(("#", " ", "\t"))]
    assert proc.returncode == 0, "\n".join(progress[-40:]) + "\n" + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())

    for key in POSITIVE:
        assert _positive(results.get(key)), (key, results.get(key))
    # A difference of two latencies: any finite number (the bus may even win on a cache hit).
    overhead = results.get("ttft_overhead_ms")
    assert isinstance(overhead, (int, float)) and math.isfinite(overhead)

    levels = results["concurrency"]
    assert [c["topics"] for c in levels] == [1, 8]
    for c in levels:
        for key in ("aggregate_tps", "ttft_p50_ms", "ttft_p95_ms"):
            assert _positive(c[key]), (c, key)

    machine, model = results["machine"], results["model"]
    assert machine["cpu"] and _positive(machine["usable_cpus"]) and _positive(machine["memory_gb"])
    assert model["file"].endswith(".gguf") and _positive(model["bytes"])
    assert results["quick"] is True

    report = (out / "benchmarks.md").read_text()
    assert "QUICK SMOKE RUN" in report
    assert "| Measure | Target | Measured | Met? |" in report
