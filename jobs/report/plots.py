"""PNG plots of one model's rows (matplotlib, headless):

  throughput-<model>.png   generated tokens/s against generation length, one line per method,
                           one panel per batch size
  quality-<model>.png      PPL, BLEU, ROUGE-L, BERTScore F1 against the cache budget m, one line per
                           method; full attention (no budget) as a dashed horizontal line
  step_time-<model>.png    time per decode step against context length, one line per method (the
                           longest run at the smallest batch)
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .methods import family_key, label, method_key, slug, sort_keys  # noqa: E402

QUALITY = [("ppl", "PPL (lower is better)"), ("bleu", "BLEU vs full"), ("rouge_l", "ROUGE-L vs full"),
           ("bertscore_f1", "BERTScore F1 vs full")]


def _save(fig, out_dir: str, name: str, legend_axes=()) -> str:
    """One legend under the panels (labels of every panel, each once), then write the PNG."""
    seen: dict[str, object] = {}
    for ax in legend_axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    if seen:
        handles, labels = list(seen.values()), list(seen)
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 4),
                   fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def throughput_plot(rows: list[dict], model: str, out_dir: str) -> str | None:
    tp = [r for r in rows if r["task"] == "throughput" and r["tokens_per_s"]]
    if not tp:
        return None
    batches = sorted({r["batch"] for r in tp})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for key in sort_keys(method_key(r) for r in tp if r["batch"] == b):
            pts = sorted((r["gen_len"], r["tokens_per_s"]) for r in tp
                         if r["batch"] == b and method_key(r) == key)
            style = "--" if key[0] == "full" else "-"
            ax.plot(*zip(*pts), style, marker="o", label=label(key))
        lengths = sorted({r["gen_len"] for r in tp if r["batch"] == b})
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(x) for x in lengths])
        ax.minorticks_off()
        ax.set_xlabel("generation length (tokens)")
        ax.set_ylabel("generated tokens/s")
        ax.set_title(f"{model}, batch {b}")
        ax.grid(alpha=0.3)
    return _save(fig, out_dir, f"throughput-{slug(model)}.png", axes[0])


def quality_plot(rows: list[dict], model: str, out_dir: str) -> str | None:
    metrics = [(m, t) for m, t in QUALITY if any(r[m] is not None for r in rows)]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    for ax, (metric, title) in zip(axes[0], metrics):
        have = [r for r in rows if r[metric] is not None]
        budgets = sorted({r["cache_size"] for r in have if r["cache_size"] is not None})
        for fam in sort_keys(family_key(r) for r in have):
            pts = sorted((r["cache_size"], r[metric]) for r in have if family_key(r) == fam)
            if fam[0] == "full" or pts[0][0] is None:
                if budgets:
                    ax.axhline(pts[0][1], ls="--", color="gray", label=label(fam))
                else:
                    ax.plot([0], [pts[0][1]], "o", label=label(fam))
                continue
            ax.plot(*zip(*pts), marker="o", label=label(fam))
        if budgets:
            ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("cache budget m (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    return _save(fig, out_dir, f"quality-{slug(model)}.png", axes[0])


def step_time_plot(rows: list[dict], model: str, out_dir: str) -> str | None:
    tp = [r for r in rows if r["task"] == "throughput" and r["step_ms"]]
    if not tp:
        return None
    gl, b = max(r["gen_len"] for r in tp), min(r["batch"] for r in tp)
    sel = [r for r in tp if r["gen_len"] == gl and r["batch"] == b]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key in sort_keys(method_key(r) for r in sel):
        r = next(r for r in sel if method_key(r) == key)
        ax.plot(r["step_ctx"], r["step_ms"], "--" if key[0] == "full" else "-", label=label(key))
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"{model}: step time, generation length {gl}, batch {b}")
    ax.grid(alpha=0.3)
    return _save(fig, out_dir, f"step_time-{slug(model)}.png", [ax])


def retrieval_plot(rows: list[dict], model: str, out_dir: str) -> str | None:
    """Retrieval accuracy heat maps: prompt length (x) by needle depth (y), one panel per method, one
    row of panels per retrieval task; full attention first, as the reference."""
    import json

    have = [r for r in rows if r["task"] == "retrieval" and r.get("retrieval_json")]
    if not have:
        return None
    recs = {method_key(r): json.loads(r["retrieval_json"]) for r in have}
    keys = sort_keys(recs)
    tasks = sorted({x["task"] for v in recs.values() for x in v})
    lengths = sorted({x["length"] for v in recs.values() for x in v})
    depths = sorted({x["depth"] for v in recs.values() for x in v})
    fig, axes = plt.subplots(len(tasks), len(keys), figsize=(2.2 + 1.9 * len(keys), 0.6 + 1.9 * len(tasks)),
                             squeeze=False)
    for i, task in enumerate(tasks):
        for j, key in enumerate(keys):
            grid = [[float("nan")] * len(lengths) for _ in depths]
            for x in recs[key]:
                if x["task"] == task:
                    grid[depths.index(x["depth"])][lengths.index(x["length"])] = x["acc"]
            ax = axes[i][j]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            if i == 0:
                ax.set_title(label(key), fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{task}\nneedle depth", fontsize=8)
            if i == len(tasks) - 1:
                ax.set_xlabel("prompt tokens", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="accuracy")
    fig.suptitle(f"{model}: retrieval accuracy", fontsize=10)
    fig.savefig(os.path.join(out_dir, f"retrieval-{slug(model)}.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f"retrieval-{slug(model)}.png"
