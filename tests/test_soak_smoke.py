"""``python -m bench.soak --quick`` runs end to end, and every figure whose goal is 0 is 0 (issue 16).

The soak starts its own nats-servers and ``lamabus serve`` processes on loopback; this runs it
as a user would, in a subprocess, with small counts, and reads the figures it wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.model]

REPO = Path(__file__).resolve().parent.parent


def test_quick_soak_has_no_crash_drop_loss_duplicate_or_disorder(tmp_path: Path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "-m", "bench.soak", "--quick", "--json", str(out),
                           "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert out.exists(), proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    parts = doc["parts"]
    assert set(parts) == {"hostile", "kill", "broker", "burst"}
    for name, part in parts.items():
        assert "error" not in part, (name, part)
    # Every part did what it planned, within its bound.
    for name, part in parts.items():
        assert part["reached"] >= part["planned"], (name, part)
    zero = doc["zero_goal"]
    assert {k for k, v in zero.items() if v != 0} == set(), {k: v for k, v in zero.items() if v != 0}
    assert doc["all_zero"] is True and proc.returncode == 0, proc.stdout[-2000:]
    hostile = parts["hostile"]
    assert hostile["structured_answers"] + hostile["deliberately_ignored"] == hostile["planned"]
    assert hostile["alive_after"] and hostile["consumer_settled"]
    assert parts["kill"]["kill_to_completed_p50_s"] is not None
    assert parts["burst"]["answered"] == parts["burst"]["planned"]
    assert "hostile payloads published" in proc.stdout  # the table
