"""jobs/report: the markdown summary and the PNG plots render from a fixture; `adore report` (issue 5)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adore.cli import main as adore_main
from jobs.report import write_report
from jobs.store import ResultStore

FIXTURE = Path(__file__).parent / "fixtures" / "eval" / "report"


def test_report_renders_from_fixture(tmp_path):
    table = ResultStore(str(FIXTURE)).read_all()
    assert table.num_rows == 30
    md = Path(write_report(table, str(tmp_path))).read_text()
    # the paper's layout: methods in rows, metrics in columns, throughput relative to full attention
    header = next(line for line in md.splitlines() if line.startswith("| method | PPL"))
    assert header.split(" | ")[1:5] == ["PPL ↓", "BLEU ↑", "ROUGE-L ↑", "BERTScore F1 ↑"]
    assert "tok/s (len 16, batch 1)" in header and header.endswith("vs full ↑ |")
    summary = md.split("### Throughput")[0].splitlines()
    rows = [line for line in summary if line.startswith("| ") and "---" not in line]
    methods = [r.split(" | ")[0][2:] for r in rows[1:]]
    assert methods == ["full", "window (m=16)", "window (m=32)", "h2o (m=16)", "h2o (m=32)",
                       "adore (m=16, K=8, R=2 promote)", "adore (m=32, K=16, R=2 promote)"]
    assert rows[1].endswith("| 1.00× |")  # full against itself
    assert "## Failed cells" in md and "random:missing" in md and "unknown random shape" in md
    assert "30 (28 ok, 2 failed)" in md and "torch 2." in md
    for name in ("throughput-random_tiny.png", "quality-random_tiny.png", "step_time-random_tiny.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"]({name})" in md


def test_adore_report_command(tmp_path, capsys):
    shutil.copytree(FIXTURE, tmp_path / "run")
    assert adore_main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report" / "report.md").is_file()
    assert "30 cells" in capsys.readouterr().out
    assert adore_main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r2"), "--title", "T"]) == 0
    assert (tmp_path / "r2" / "report.md").read_text().startswith("# T\n")
    assert adore_main(["report", str(tmp_path / "nothing")]) == 2
    assert "no results" in capsys.readouterr().err


@pytest.mark.parametrize("drop", ["throughput", "ppl"])
def test_report_with_some_tasks_missing(tmp_path, drop):
    import pyarrow.compute as pc

    table = ResultStore(str(FIXTURE)).read_all()
    table = table.filter(pc.not_equal(table["task"], drop))
    md = Path(write_report(table, str(tmp_path))).read_text()
    assert ("### Throughput" in md) == (drop != "throughput")
    assert (tmp_path / "quality-random_tiny.png").is_file()


def test_report_keeps_to_the_latest_grid(tmp_path, capsys):
    """A re-run with a changed preset writes new cells beside the old ones: the report shows the latest
    run's grid (grid.json), says how many cells it left out, and `--all` shows every cell."""
    import json

    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    ids = sorted(ResultStore(str(run)).read_all()["cell_id"].to_pylist())
    (run / "grid.json").write_text(json.dumps({"cells": ids[:20], "config": {}, "run_id": "x"}))
    assert adore_main(["report", str(run)]) == 0
    assert "20 cells; 10 cells of earlier grids left out" in capsys.readouterr().out
    assert "- cells: 20 " in (run / "report" / "report.md").read_text()
    assert adore_main(["report", str(run), "--all"]) == 0
    assert "(30 cells)" in capsys.readouterr().out
    (run / "grid.json").write_text(json.dumps({"cells": ["gone"], "config": {}, "run_id": "y"}))
    assert adore_main(["report", str(run)]) == 2
    assert "--all reports every cell" in capsys.readouterr().err
