"""The report of an evaluation: report.md (tables) and PNG plots, from the cells' Parquet files.

    adore report OUT               -> OUT/report/report.md, OUT/report/*.png
    adore report s3://b/x --out r  -> r/report.md, r/*.png
"""

from __future__ import annotations

import os

import pyarrow as pa

from .methods import by_model
from .plots import quality_plot, retrieval_plot, step_time_plot, throughput_plot
from .table import render


def write_report(table: pa.Table, out_dir: str, title: str | None = None) -> str:
    """Write report.md and the plots into out_dir (a local directory); returns report.md's path."""
    os.makedirs(out_dir, exist_ok=True)
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    plots: dict[tuple, list[tuple[str, str]]] = {}
    for (model, dtype), mrows in by_model(ok).items():
        made = [("throughput against generation length", throughput_plot(mrows, model, out_dir)),
                ("quality against cache budget", quality_plot(mrows, model, out_dir)),
                ("time per step against context length", step_time_plot(mrows, model, out_dir)),
                ("retrieval accuracy by prompt length and needle depth", retrieval_plot(mrows, model, out_dir))]
        plots[(model, dtype)] = [(c, f) for c, f in made if f]
    names = sorted({r["job_name"] for r in rows if r["job_name"]})
    title = title or f"ADORE evaluation: {', '.join(names) or 'results'}"
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(rows, plots, title))
    return path
