"""jobs/eval_all.py in-process (--local, no Ray): failed cells are recorded and the job goes on;
re-running resumes (done cells skipped, failed cells retried); the report follows (issue 5)."""

from __future__ import annotations

import json

import yaml

from jobs.eval_all import main
from jobs.store import ResultStore

GRID = {"name": "failing", "models": ["random:tiny", "random:nope"], "policies": ["full", "window"],
        "cache_sizes": [16], "gen_lengths": [4], "batch_sizes": [1],
        "tasks": {"throughput": {"prompt_tokens": 8}, "ppl": {"tokens": 32}}}


def _write(tmp_path, grid) -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return str(path)


def test_failed_cells_are_recorded_and_the_job_goes_on(tmp_path, capsys):
    cfg, out = _write(tmp_path, GRID), str(tmp_path / "out")
    assert main(["--config", cfg, "--out", out, "--local", "--quiet"]) == 1  # some cells failed
    rows = {r["cell_id"]: r for r in ResultStore(out).read_all().to_pylist()}
    assert len(rows) == 8  # 2 models x (2 throughput + 2 ppl)
    bad = [r for r in rows.values() if r["status"] == "error"]
    good = [r for r in rows.values() if r["status"] == "ok"]
    assert len(bad) == 4 and all(r["model"] == "random:nope" for r in bad)
    assert all("unknown random shape" in r["error"] and r["ppl"] is None for r in bad)
    assert len(good) == 4 and all(r["model"] == "random:tiny" for r in good)
    assert all(r["ppl"] > 1 for r in good if r["task"] == "ppl")
    assert all(r["tokens_per_s"] > 0 and r["kv_cache_bytes"] > 0 for r in good if r["task"] == "throughput")
    assert all(r["attempt"] == 1 and r["job_name"] == "failing" and r["torch"] for r in good)
    grid = json.loads((tmp_path / "out" / "grid.json").read_text())
    assert sorted(grid["cells"]) == sorted(rows)
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "## Failed cells" in report and "unknown random shape" in report
    assert "4 failed" in capsys.readouterr().out

    # re-run: ok cells are skipped (their rows untouched), failed ones retried (attempt 2)
    assert main(["--config", cfg, "--out", out, "--local", "--quiet", "--no-report"]) == 1
    again = {r["cell_id"]: r for r in ResultStore(out).read_all().to_pylist()}
    assert set(again) == set(rows)
    for cid, r in again.items():
        if r["status"] == "ok":
            assert r["run_id"] == rows[cid]["run_id"] and r["started_at"] == rows[cid]["started_at"]
        else:
            assert r["attempt"] == 2 and r["run_id"] != rows[cid]["run_id"]
    assert "0 to run" not in capsys.readouterr().out

    # --no-retry-errors: nothing left to run
    flags = ["--local", "--quiet", "--no-report", "--no-retry-errors"]
    assert main(["--config", cfg, "--out", out, *flags]) == 1
    assert "4 already done, 0 to retry, 0 to run" in capsys.readouterr().out


def test_dry_run_and_usage_errors(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["--preset", "ci", "--out", out, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "15 cells, 0 already done" in text and "fidelity random:tiny-gqa adore" in text
    assert main(["--preset", "nope", "--out", out]) == 2
    assert "unknown preset" in capsys.readouterr().err
    bad = _write(tmp_path, {**GRID, "policies": ["lru"]})
    assert main(["--config", bad, "--out", out]) == 2


def test_job_needs_an_absolute_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # as in a submitted job's driver
    assert main(["--preset", "ci", "--out", "relative/out", "--dry-run"]) == 2
    assert "absolute path" in capsys.readouterr().err


def test_workers_take_one_gpu_each_where_there_are_gpus():
    from jobs.fanout import plan_workers

    auto = {"cpus_per_cell": 1, "gpus_per_cell": "auto", "workers": None}
    assert plan_workers(auto, {"CPU": 32.0, "GPU": 4.0}, 100) == (4, {"num_gpus": 1, "num_cpus": 1.0})
    assert plan_workers(auto, {"CPU": 2.0}, 100) == (2, {"num_cpus": 1.0})
    assert plan_workers(auto, {"CPU": 2.0}, 1)[0] == 1  # never more workers than cells
    assert plan_workers({**auto, "gpus_per_cell": 0}, {"CPU": 8.0, "GPU": 2.0}, 100) == (8, {"num_cpus": 1.0})
    two = {**auto, "cpus_per_cell": 2, "workers": 3}
    assert plan_workers(two, {"CPU": 16.0}, 100) == (3, {"num_cpus": 2.0})
