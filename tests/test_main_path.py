"""The README's main command on a fresh machine (issue 16): `scripts/main.sh` starts a private local
Ray cluster with `jobs/local_cluster.sh`, submits the evaluation as a Ray Job with `ray job submit`,
and writes the report, with HOME pointing at a new empty directory, so that nothing from the user's
home (a Ray auth token, caches) can make it pass. The `ci` preset keeps it to about a minute.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


def test_main_command_with_an_empty_home(tmp_path):
    home, out, ray_dir = tmp_path / "home", tmp_path / "eval", Path("/tmp") / f"adore-main-{os.getpid()}"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PRESET="ci", OUT=str(out), ADORE_RAY_DIR=str(ray_dir),
               RAY_DISABLE_USAGE_STATS="1")
    try:
        res = subprocess.run(["bash", "scripts/main.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    finally:
        subprocess.run(["bash", "jobs/local_cluster.sh", "stop"], cwd=REPO, env=env, capture_output=True)
    log = res.stdout[-4000:] + res.stderr[-4000:]
    assert res.returncode == 0, log
    report = (out / "report" / "report.md").read_text()
    assert "adore" in report and "full" in report, report[:2000]
    assert len(list((out / "cells").glob("*.parquet"))) >= 12, log
    assert not (home / ".ray").exists(), "the cluster must not depend on (or write) ~/.ray"
    token = ray_dir / "auth_token"
    assert token.stat().st_mode & 0o077 == 0 and len(token.read_text()) >= 32
    assert not (ray_dir / "pid").exists()  # stopped by main.sh's trap
