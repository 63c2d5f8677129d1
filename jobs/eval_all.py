"""Ray Job: expand the evaluation grid, run every cell on the cluster, one Parquet row per cell.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/eval_all.py --preset smoke --out /abs/path/out/eval/smoke
    python jobs/eval_all.py --preset ci --out out/eval/ci      # no cluster: starts a private local Ray
    python jobs/eval_all.py --config my.yaml --out s3://bucket/adore-eval --models /ckpt/llama-2-7b

Re-running the same command resumes: finished cells are skipped, failed ones are run again.
Exit code 0 when every cell is ok, 1 when some failed (their rows hold the errors), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `jobs` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adore.config import UserError  # noqa: E402
from jobs.grid import describe_cell, expand, load_config, preset_names  # noqa: E402
from jobs.sources import load_source, source_sha  # noqa: E402
from jobs.store import ResultStore  # noqa: E402

IN_RAY_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in a submitted job's driver


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="eval_all.py", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"a shipped grid: {', '.join(preset_names())} (default smoke)")
    src.add_argument("--config", help="a YAML grid (keys as in jobs/presets/*.yaml)")
    p.add_argument("--out", required=True, help="results directory: a local path or a pyarrow URI "
                   "(s3://bucket/prefix, gs://..., file:///...)")
    p.add_argument("--models", "--model", dest="models",
                   help="comma-separated models replacing the grid's (e.g. a checkpoint directory)")
    p.add_argument("--name", help="job name recorded in every row (default: the preset's)")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS, as set in a submitted job; "
                   "without either a private local Ray is started)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the private local Ray")
    p.add_argument("--ray-temp-dir", default=None, help="temp dir of the private local Ray")
    p.add_argument("--workers", type=int, default=None, help="at most this many parallel cells")
    p.add_argument("--local", action="store_true", help="no Ray: run the cells in this process")
    p.add_argument("--no-retry-errors", action="store_true", help="skip cells that failed before too")
    p.add_argument("--dry-run", action="store_true", help="list the cells to run and stop")
    p.add_argument("--no-report", action="store_true", help="do not write OUT/report at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def submission_id() -> str | None:
    """The submission id of the Ray job this driver runs in (None outside `ray job submit`)."""
    try:
        meta = json.loads(os.environ.get(IN_RAY_JOB) or "{}").get("metadata") or {}
    except ValueError:
        return None
    return meta.get("job_submission_id")


def connect_ray(args) -> None:
    import ray

    if args.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=args.address or os.environ["RAY_ADDRESS"], logging_level="WARNING")
    else:
        ray.init(num_cpus=args.num_cpus, _temp_dir=args.ray_temp_dir, include_dashboard=False,
                 logging_level="WARNING")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"eval_all: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eval_all: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def run(args) -> int:
    from tqdm import tqdm

    overrides = {"models": args.models.split(",") if args.models else None, "name": args.name}
    if args.workers:
        overrides["resources"] = {"workers": args.workers}
    cfg = load_config(args.preset, args.config, overrides)
    if os.environ.get(IN_RAY_JOB) and "://" not in args.out and not os.path.isabs(args.out):
        raise UserError("in a submitted job --out must be an absolute path or a URI: the job's working "
                        "directory is a temporary copy that the cluster deletes")
    specs = {cfg["data"], *(t["data"] for t in cfg["tasks"].values() if "data" in t)}
    sources = {s: load_source(s) for s in specs}
    cells = expand(cfg, {s: source_sha(v) for s, v in sources.items()})
    store = ResultStore(args.out)
    store.clean_stale()
    prior = store.statuses()
    status = {c["cell_id"]: prior.get(c["cell_id"], ("",))[0] for c in cells}
    done = {cid for cid, s in status.items() if s == "ok"}
    skip_err = {cid for cid, s in status.items() if s == "error" and args.no_retry_errors}
    todo = [c for c in cells if c["cell_id"] not in done | skip_err]
    run_id = submission_id() or uuid.uuid4().hex[:12]
    log = print
    log(f"grid {cfg['name']!r}: {len(cells)} cells, {len(done)} already done, "
        f"{sum(1 for c in todo if c['cell_id'] in prior)} to retry, {len(todo)} to run -> {store.root}")
    if args.dry_run:
        for c in todo:
            log(f"  {c['cell_id']}  {describe_cell(c)}")
        return 0
    store.write_json("grid.json", {"config": cfg, "cells": [c["cell_id"] for c in cells], "run_id": run_id})

    by_id = {c["cell_id"]: c for c in todo}
    counts = {"done": len(done), "failed": len(skip_err)}
    tty = sys.stderr.isatty()  # in a job's log, redraw the bar rarely: the per-cell lines say it all
    bar = tqdm(total=len(cells), initial=len(done) + len(skip_err), desc="cells", unit="cell",
               disable=args.quiet, file=sys.stderr, dynamic_ncols=True, mininterval=0.1 if tty else 60)
    bar.set_postfix(counts, refresh=False)
    t0 = time.perf_counter()

    def on_row(row: dict) -> None:
        row["attempt"] = prior.get(row["cell_id"], ("", 0))[1] + 1
        row["run_id"], row["job_name"] = run_id, cfg["name"]
        store.write(row)
        ok = row["status"] == "ok"
        counts["done" if ok else "failed"] += 1
        cell = by_id[row["cell_id"]]
        msg = "ok" if ok else "FAILED: " + (row.get("error") or "").splitlines()[0][:200]
        bar.write(f"[{counts['done']} done, {counts['failed']} failed / {len(cells)}] "
                  f"{describe_cell(cell)} ({row.get('seconds') or 0:.1f}s) {msg}", file=sys.stderr)
        bar.set_postfix(counts, refresh=False)
        bar.update(1)

    if todo:
        if args.local:
            from jobs.fanout import run_local

            run_local(todo, sources, on_row, threads=int(cfg["resources"].get("cpus_per_cell") or 1))
        else:
            import ray

            from jobs.fanout import run_ray

            connect_ray(args)
            try:
                run_ray(todo, sources, cfg["resources"], on_row, log=lambda m: bar.write(m, file=sys.stderr))
            finally:
                ray.shutdown()
    bar.close()
    log(f"finished in {time.perf_counter() - t0:.0f}s: {counts['done']} cells done, "
        f"{counts['failed']} failed (rerun the same command to retry the failed ones)")
    if not args.no_report and store.local:
        from jobs.report import write_report

        out = write_report(store.read_latest()[0], f"{store.root}/report")
        log(f"report: {out}")
    return 0 if counts["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
