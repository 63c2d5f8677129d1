"""Grouping result rows by method (a policy with its knobs) for tables and plots."""

from __future__ import annotations

import re

ORDER = ["full", "window", "strided", "sink", "h2o", "adore", "adore-norebuild", "adore-nocontroller"]


def method_key(r: dict) -> tuple:
    return (r["policy"], r["cache_size"], r["top_k"], r["rebuild"], r["rebuild_mode"])


def family_key(r: dict) -> tuple:
    """The method without its budget (one line across budgets in a plot). top_k is left out too: a
    grid has one top_k setting, which may be a share of the budget (K = m/2)."""
    return (r["policy"], None, r["rebuild"], r["rebuild_mode"])


def _sort(key: tuple) -> tuple:
    pol = key[0]
    rank = ORDER.index(pol) if pol in ORDER else len(ORDER)
    return (rank, pol, *[(v is None, v if v is not None else 0) if not isinstance(v, str) else (False, v)
                         for v in key[1:]])


def sort_keys(keys) -> list:
    return sorted(set(keys), key=_sort)


def label(key: tuple) -> str:
    """'adore (m=192, K=96, R=8 promote)' from a method key, 'adore (K=96, R=8 promote)' from a family key."""
    if len(key) == 5:
        pol, m, k, r, mode = key
    else:
        (pol, k, r, mode), m = key, None
    parts = []
    if m is not None:
        parts.append(f"m={m}")
    if k is not None:
        parts.append(f"K={k}")
    if r:
        parts.append(f"R={r} {mode}")
    return f"{pol} ({', '.join(parts)})" if parts else pol


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "model"


def by_model(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(model, dtype) -> its rows, in a stable order."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["model"], r["dtype"]), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))))


def headline_setting(rows: list[dict]) -> tuple | None:
    """(gen_len, batch) for the main table's throughput: the longest length, then the largest batch at
    which full attention ran (where it did not, bounded methods have no reference to compare with)."""
    tp = [r for r in rows if r["task"] == "throughput" and r["tokens_per_s"] is not None]
    if not tp:
        return None
    gl = max(r["gen_len"] for r in tp)
    full = [r["batch"] for r in tp if r["gen_len"] == gl and r["policy"] == "full"]
    return gl, max(full or [r["batch"] for r in tp if r["gen_len"] == gl])
