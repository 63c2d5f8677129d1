"""Results on disk (or any pyarrow filesystem): one Parquet file per cell, written atomically.

    OUT/cells/<cell_id>.parquet   one row (jobs/schema.py), status "ok" or "error"
    OUT/grid.json                 the configuration of the latest run and its cell ids (informational)

Atomic writes: on a local filesystem a row goes to a hidden temporary name in cells/ and is renamed
over the final name (rename is atomic on POSIX), so a reader or a killed job never sees half a file.
Object stores (s3://, gs://) have no rename but publish an object only once it is complete, so there
the final name is written once, directly.

Resume: cells whose file says status "ok" are finished and skipped; cells whose file says "error"
are run again and their file is replaced (the attempt count goes up). One file per cell id means a
cell can never appear twice, whatever was killed when.
"""

from __future__ import annotations

import json
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .schema import SCHEMA, row_table

STALE_TMP_S = 3600  # temporary files older than this are leftovers of a killed writer


def open_uri(out: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) for a local path or a URI such as s3://bucket/prefix or file:///x."""
    if "://" in out:
        return pafs.FileSystem.from_uri(out)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(out)


class ResultStore:
    def __init__(self, out: str | tuple[pafs.FileSystem, str]) -> None:
        self.fs, self.root = open_uri(out) if isinstance(out, str) else out
        self.root = self.root.rstrip("/")
        self.cells_dir = f"{self.root}/cells"
        self.fs.create_dir(self.cells_dir, recursive=True)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, cell_id: str) -> str:
        return f"{self.cells_dir}/{cell_id}.parquet"

    def _cell_files(self) -> list[pafs.FileInfo]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.cells_dir, allow_not_found=True))
        return [i for i in infos if i.type == pafs.FileType.File]

    def statuses(self) -> dict[str, tuple[str, int]]:
        """cell_id -> (status, attempt) of every written cell."""
        out = {}
        for info in self._cell_files():
            if info.base_name.startswith(".") or not info.base_name.endswith(".parquet"):
                continue
            t = pq.read_table(info.path, filesystem=self.fs, columns=["cell_id", "status", "attempt"])
            for r in t.to_pylist():
                out[r["cell_id"]] = (r["status"], r["attempt"] or 1)
        return out

    def write(self, row: dict) -> str:
        """Write one row as cells/<cell_id>.parquet, atomically. Returns the final path."""
        table = row_table(row)
        final = self.path(row["cell_id"])
        if self.local:
            tmp = f"{self.cells_dir}/.{row['cell_id']}.{uuid.uuid4().hex[:8]}.tmp"
            pq.write_table(table, tmp, filesystem=self.fs)
            self.fs.move(tmp, final)
        else:
            pq.write_table(table, final, filesystem=self.fs)
        return final

    def clean_stale(self) -> int:
        """Delete temporary files that a killed writer left behind (older than an hour)."""
        n = 0
        now = time.time()
        for info in self._cell_files():
            if info.base_name.startswith(".") and info.base_name.endswith(".tmp"):
                if info.mtime is None or now - info.mtime.timestamp() > STALE_TMP_S:
                    self.fs.delete_file(info.path)
                    n += 1
        return n

    def read_all(self) -> pa.Table:
        """Every cell's row, one table with the fixed schema (empty if none)."""
        tables = [pq.read_table(i.path, filesystem=self.fs) for i in self._cell_files()
                  if i.base_name.endswith(".parquet") and not i.base_name.startswith(".")]
        if not tables:
            return SCHEMA.empty_table()
        return pa.concat_tables([conform(t) for t in tables])

    def latest_grid(self) -> set[str] | None:
        """The cell ids of the latest run's grid (grid.json), or None where no run wrote one."""
        try:
            with self.fs.open_input_stream(f"{self.root}/grid.json") as f:
                return set(json.loads(f.read())["cells"])
        except (FileNotFoundError, OSError, KeyError, ValueError):
            return None

    def read_latest(self) -> tuple[pa.Table, int]:
        """The rows of the latest run's grid, and how many cells of earlier grids the store also holds
        (a re-run with a changed preset writes new cells beside the old ones: a report of both would
        put two measurements of one method side by side). All rows where there is no grid.json."""
        table, grid = self.read_all(), self.latest_grid()
        if grid is None:
            return table, 0
        latest = table.filter(pc.is_in(table["cell_id"], value_set=pa.array(sorted(grid), pa.string())))
        return latest, table.num_rows - latest.num_rows

    def write_json(self, name: str, obj) -> None:
        data = json.dumps(obj, indent=1, sort_keys=True, default=str).encode()
        with self.fs.open_output_stream(f"{self.root}/{name}") as f:
            f.write(data)


def conform(t: pa.Table) -> pa.Table:
    """A table in exactly SCHEMA: missing columns become nulls (files of an older schema version)."""
    if t.schema == SCHEMA:
        return t
    cols = [t.column(f.name).cast(f.type) if f.name in t.column_names else pa.nulls(len(t), f.type)
            for f in SCHEMA]
    return pa.Table.from_arrays(cols, schema=SCHEMA)
