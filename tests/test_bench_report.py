"""bench/report.py: BENCHMARKS.md's tables are what bench/results/ gives, and stay so."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_tables_match_the_json(report, capsys):
    assert report.main(["--check"]) == 0, capsys.readouterr().err


def test_every_table_is_generated(report):
    """No markdown table outside the markers: each one comes from bench/results/."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    outside = report.MARKER.sub("", text)
    table_lines = [line for line in outside.splitlines() if line.startswith("|---")]
    assert table_lines == []
    assert len(report.MARKER.findall(text)) >= 28


def test_a_hand_edited_table_is_stale_and_is_rewritten(report, tmp_path, capsys):
    path = tmp_path / "BENCHMARKS.md"
    text = (ROOT / "BENCHMARKS.md").read_text()
    edited = text.replace("| 2.49x |", "| 2.94x |", 1)   # the summary's DeepCache row
    assert edited != text
    path.write_text(edited)
    assert report.main(["--check", "--file", str(path)]) == 1
    assert "stale" in capsys.readouterr().err
    assert report.main(["--file", str(path)]) == 0
    assert path.read_text() == text


def test_unknown_table_names_its_missing_json(report, tmp_path):
    path = tmp_path / "B.md"
    path.write_text("<!-- table: no-such-table -->\n| a |\n|---|\n<!-- end -->\n")
    with pytest.raises(SystemExit, match="no-such-table"):
        report.main(["--check", "--file", str(path)])


def test_summary_picks_the_fastest_setting_within_the_quality_bounds(report):
    records = [
        {"config": "baseline ddim:50 cfg=4", "adherence": 0.90, "psnr": 100.0, "speedup_wall": 1.0},
        {"config": "ddim:50 cfg=4 + x:a=1", "adherence": 0.90, "psnr": 40.0, "speedup_wall": 2.0},
        {"config": "ddim:50 cfg=4 + x:a=2", "adherence": 0.86, "psnr": 38.0, "speedup_wall": 3.0},  # -4 points
        {"config": "ddim:50 cfg=4 + x:a=3", "adherence": 0.90, "psnr": 34.0, "speedup_wall": 4.0},  # < 35 dB
        {"config": "ddim:50 cfg=4 + x:a=4", "adherence": 0.87, "psnr": 35.0, "speedup_wall": 2.5},  # -3: kept
        {"config": "ddim:50 cfg=4 + y", "adherence": 0.95, "psnr": 60.0, "speedup_wall": 9.0},       # other method
    ]
    assert report.best_setting(records, "x")["config"].endswith("x:a=4")
    assert report.best_setting(records, "z") is None
