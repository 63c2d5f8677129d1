"""jobs/eval_all.py through a real, private local Ray (issue 5):

* the `ci` preset run as a subprocess, killed (SIGKILL, whole process group) once a few cells are
  written, then re-run: the grid completes with every cell exactly once, and the cells finished before
  the kill are kept, not redone;
* a worker process that dies mid-cell is recorded as that cell's error and the job goes on.

Each run owns its Ray instance (ray.init with num_cpus and a private temp dir, then ray.shutdown);
nothing here calls `ray stop`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from jobs.grid import expand, load_config
from jobs.sources import load_source, source_sha
from jobs.store import ResultStore

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ray_tmp():
    """A short private Ray temp dir (Ray's socket paths must stay under 108 bytes)."""
    d = tempfile.mkdtemp(prefix="adore-evt-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _ray_processes(tmp: str) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if tmp in cmd:
            out.append(f"{pid} {cmd[:120]}")
    return out


def _cmd(out: str, tmp: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "eval_all.py"), "--preset", "ci", "--out", out,
            "--num-cpus", "2", "--ray-temp-dir", tmp, "--quiet"]


def test_killed_midway_then_rerun_completes_each_cell_once(tmp_path, ray_tmp):
    out = str(tmp_path / "out")
    cells_dir = tmp_path / "out" / "cells"
    env = {**os.environ, "ADORE_EVAL_CELL_DELAY": "1.0", "RAY_DISABLE_USAGE_STATS": "1"}
    proc = subprocess.Popen(_cmd(out, ray_tmp), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    try:
        while len(list(cells_dir.glob("*.parquet"))) < 3:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "no cells written in time"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its session, at once
        proc.wait()
    first = {r["cell_id"]: r for r in ResultStore(out).read_all().to_pylist()}
    assert 3 <= len(first) < 12, "the kill should land midway"
    for _ in range(50):  # Ray's processes share the driver's fate
        if not _ray_processes(ray_tmp):
            break
        time.sleep(0.2)
    assert not _ray_processes(ray_tmp)

    res = subprocess.run([*_cmd(out, ray_tmp), "--no-report"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "RAY_DISABLE_USAGE_STATS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"{len(first)} already done" in res.stdout

    cfg = load_config("ci")
    expected = {c["cell_id"] for c in expand(cfg, {cfg["data"]: source_sha(load_source(cfg["data"]))})}
    files = sorted(p.stem for p in cells_dir.iterdir())
    assert files == sorted(expected)  # one file per cell, no temporary files left
    rows = ResultStore(out).read_all().to_pylist()
    assert sorted(r["cell_id"] for r in rows) == sorted(expected)  # each cell exactly once
    assert all(r["status"] == "ok" and r["attempt"] == 1 and r["node_id"] for r in rows)
    for r in rows:  # what the killed run finished was kept, not redone
        if r["cell_id"] in first:
            assert r["run_id"] == first[r["cell_id"]]["run_id"]
    assert len({r["run_id"] for r in rows}) == 2


def test_a_worker_crash_is_recorded_and_the_job_goes_on(tmp_path, ray_tmp, monkeypatch):
    from jobs.eval_all import main

    grid = {"name": "crash", "models": ["random:tiny", "random:tiny-gqa"], "policies": ["window"],
            "cache_sizes": [16], "tasks": {"ppl": {"tokens": 24}}, "resources": {"workers": 1}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
    monkeypatch.setenv("ADORE_EVAL_FAULT", "random:tiny-gqa")  # its cells kill their worker process
    out = str(tmp_path / "out")
    rc = main(["--config", str(tmp_path / "g.yaml"), "--out", out, "--num-cpus", "1", "--ray-temp-dir",
               ray_tmp, "--quiet", "--no-report"])
    assert rc == 1
    rows = {r["model"]: r for r in ResultStore(out).read_all().to_pylist()}
    assert rows["random:tiny"]["status"] == "ok" and rows["random:tiny"]["ppl"] > 1
    assert rows["random:tiny-gqa"]["status"] == "error"
    assert rows["random:tiny-gqa"]["error"].startswith("worker died")
