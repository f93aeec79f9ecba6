"""bench/report_apart.py's section of ratios measured apart: read from the benches' JSON files, judged against targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report, report_apart

BENCH = Path(report.__file__).parent


@pytest.fixture
def side_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # report_apart finds the JSON files beside its own module; point it at a scratch copy of the module's place.
    monkeypatch.setattr(report_apart, "__file__", str(tmp_path / "report_apart.py"))
    return tmp_path


def test_no_side_files_no_section(side_dir: Path):
    assert report_apart.side_measures_section() is None


def test_each_ratio_is_shown_and_judged_against_its_target(side_dir: Path):
    (side_dir / "grammar.json").write_text(json.dumps({"by_streams": {
        "4": {"ratio": 0.75, "cpu_ratio": 0.8}, "1": {"ratio": 0.949, "cpu_ratio": 0.947}}}))
    (side_dir / "metrics.json").write_text(json.dumps({
        "metrics_on_off_ratio": 1.01, "metrics_ns_per_token": 1014.0, "metrics_cost_bound_ratio": 0.99989,
        "metrics_target": 0.98}))
    section = report_apart.side_measures_section()
    assert section is not None
    rows = [line for line in section.splitlines() if line.startswith("| JSON schema") or line.startswith("| metrics")]
    assert rows[0].startswith("| JSON schema ÷ free tok/s, 1 stream(s)") and rows[0].endswith("| ≥ 0.8 | yes |")
    assert "0.949" in rows[0]
    assert rows[1].startswith("| JSON schema ÷ free tok/s, 4 stream(s)") and rows[1].endswith("| **no** |")
    assert "1.010" in rows[2] and rows[2].endswith("| ≥ 0.98 | yes |")
    assert "analysis" not in section and "JetStream" not in section  # only what was measured


def test_the_committed_page_shows_the_committed_side_figures():
    grammar = json.loads((BENCH / "grammar.json").read_text())
    page = report.render(json.loads((BENCH / "results.json").read_text()))
    assert "## 7. Measured apart" in page
    assert f"{grammar['by_streams']['1']['ratio']:.3f}" in page
