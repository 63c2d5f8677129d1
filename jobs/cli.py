"""`adore report DIR [--out OUT]`: the markdown summary and PNG plots of an evaluation's results.

Registered through the entry-point group `adore.commands` (pyproject.toml), so `adore` itself never
imports this package.
"""

from __future__ import annotations

import argparse

from adore.config import UserError


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .store import ResultStore, open_uri

    fs, root = open_uri(args.dir)
    import pyarrow.fs as pafs

    if fs.get_file_info(f"{root.rstrip('/')}/cells").type != pafs.FileType.Directory:
        raise UserError(f"{args.dir} holds no results (no cells/ directory): run jobs/eval_all.py first")
    store = ResultStore((fs, root))
    table, others = (store.read_all(), 0) if args.all else store.read_latest()
    if table.num_rows == 0:
        raise UserError(f"{args.dir}/cells holds no result files" + (" of the latest run's grid (grid.json): "
                                                                      "--all reports every cell" if others else ""))
    out = args.out or (f"{root.rstrip('/')}/report" if "://" not in args.dir else "report")
    path = write_report(table, out, title=args.title)
    print(f"{path} ({table.num_rows} cells" + (f"; {others} cells of earlier grids left out: --all reports them"
                                                  if others else "") + ")")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="markdown table + PNG plots of jobs/eval_all.py results")
    p.add_argument("dir", help="the results directory given to eval_all.py --out (path or URI)")
    p.add_argument("--out", default=None, help="local directory for report.md and the plots "
                   "(default DIR/report for a local DIR, ./report for a URI)")
    p.add_argument("--title", default=None)
    p.add_argument("--all", action="store_true", help="report every cell in DIR, not only those of the "
                   "latest run's grid (DIR/grid.json)")
    p.set_defaults(func=cmd_report)
