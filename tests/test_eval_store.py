"""jobs/store.py + jobs/schema.py: atomic per-cell Parquet files, resume statuses, a stable and
documented schema, pyarrow filesystems other than the local one (issue 5)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.schema import FIELDS, SCHEMA, SCHEMA_VERSION, row_table
from jobs.store import ResultStore, conform

SCHEMA_MD = Path(__file__).resolve().parents[1] / "jobs" / "SCHEMA.md"


def _row(cid: str, status: str = "ok", **kw) -> dict:
    return {"cell_id": cid, "status": status, "task": "ppl", "model": "random:tiny", "policy": "window",
            "cache_size": 16, "ppl": 12.5, "step_ms": [1.0, 2.0], "step_ctx": [10, 11],
            "started_at": dt.datetime.now(dt.timezone.utc), **kw}


def test_schema_is_documented_column_by_column():
    """SCHEMA.md lists every column with its exact pyarrow type, in order."""
    doc = re.findall(r"^\| `([a-z0-9_]+)` \| ([^|]+?) \|", SCHEMA_MD.read_text(), flags=re.M)
    assert doc == [(n, str(t)) for n, t in FIELDS]
    assert f"version {SCHEMA_VERSION}" in SCHEMA_MD.read_text().splitlines()[0]


def test_schema_is_stable():
    """A pinned fingerprint: edit it only together with SCHEMA.md (and SCHEMA_VERSION for changes in
    meaning or type; new columns go at the end, before extra_json)."""
    assert SCHEMA.names[:3] == ["schema_version", "cell_id", "status"] and SCHEMA.names[-1] == "extra_json"
    assert len(SCHEMA) == 74
    t = row_table({"cell_id": "a", "status": "ok", "unexpected": 3})
    assert t.schema == SCHEMA and t.num_rows == 1
    assert t.column("extra_json")[0].as_py() == '{"unexpected": 3}'
    assert t.column("schema_version")[0].as_py() == SCHEMA_VERSION


def test_write_is_atomic_and_one_file_per_cell(tmp_path):
    store = ResultStore(str(tmp_path / "out"))
    store.write(_row("c1"))
    store.write(_row("c2", "error", error="ValueError: x"))
    store.write(_row("c1", ppl=13.0))  # rewriting a cell replaces its file
    files = sorted(p.name for p in (tmp_path / "out" / "cells").iterdir())
    assert files == ["c1.parquet", "c2.parquet"]  # no temporary files left behind
    assert store.statuses() == {"c1": ("ok", 1), "c2": ("error", 1)}
    table = store.read_all()
    assert table.schema == SCHEMA and table.num_rows == 2
    rows = {r["cell_id"]: r for r in table.to_pylist()}
    assert rows["c1"]["ppl"] == 13.0 and rows["c2"]["error"] == "ValueError: x"
    assert pq.read_table(tmp_path / "out" / "cells").num_rows == 2  # plain pyarrow reads the directory


def test_stale_temporary_files_are_ignored_and_cleaned(tmp_path):
    store = ResultStore(str(tmp_path))
    store.write(_row("c1"))
    tmp = tmp_path / "cells" / ".c2.deadbeef.tmp"
    tmp.write_bytes(b"half a parquet file")
    assert set(store.statuses()) == {"c1"} and store.read_all().num_rows == 1
    assert store.clean_stale() == 0  # fresh: might belong to a writer still running
    import os

    os.utime(tmp, (0, 0))
    assert store.clean_stale() == 1 and not tmp.exists()


def test_file_uri_and_non_local_filesystem(tmp_path):
    """URIs go through pyarrow.fs; a filesystem without atomic rename gets the final name written once."""
    uri_store = ResultStore(f"file://{tmp_path}/uri")
    uri_store.write(_row("c1"))
    assert (tmp_path / "uri" / "cells" / "c1.parquet").is_file()

    fsspec = pytest.importorskip("fsspec")
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    mem = PyFileSystem(FSSpecHandler(fsspec.filesystem("memory")))
    store = ResultStore((mem, "/bucket/adore-eval"))
    assert not store.local
    store.write(_row("c1"))
    store.write(_row("c2", "error"))
    assert store.statuses() == {"c1": ("ok", 1), "c2": ("error", 1)}
    assert store.read_all().num_rows == 2
    store.write_json("grid.json", {"cells": ["c1", "c2"]})


def test_older_files_conform_to_the_schema(tmp_path):
    old = pa.table({"cell_id": ["c0"], "status": ["ok"], "ppl": [9.0]})
    pq.write_table(old, tmp_path / "c0.parquet")
    t = conform(pq.read_table(tmp_path / "c0.parquet"))
    assert t.schema == SCHEMA and t.to_pylist()[0]["ppl"] == 9.0 and t.to_pylist()[0]["bleu"] is None
