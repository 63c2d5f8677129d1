"""The markdown summary: the paper's layout (methods in rows, metrics in columns, throughput relative
to full attention), then throughput details, failed cells, and the hardware and versions."""

from __future__ import annotations

from .methods import by_model, headline_setting, label, method_key, sort_keys


def _fmt(v, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def _bytes(b) -> str:
    if b is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.3g} {unit}"
        b /= 1024
    return "–"


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _first(rows: list[dict], key: tuple, task: str, **match) -> dict | None:
    for r in rows:
        if r["task"] == task and method_key(r) == key and all(r[k] == v for k, v in match.items()):
            return r
    return None


def summary_table(rows: list[dict]) -> str:
    """One model's rows -> the main table."""
    head = headline_setting(rows)
    full_tp = None
    if head:
        full_tp = next((r["tokens_per_s"] for r in rows if r["task"] == "throughput" and r["policy"] == "full"
                        and (r["gen_len"], r["batch"]) == head), None)
    out = []
    with_retrieval = any(r["task"] == "retrieval" for r in rows)
    for key in sort_keys(method_key(r) for r in rows):
        ppl, fid = _first(rows, key, "ppl"), _first(rows, key, "fidelity")
        tp = _first(rows, key, "throughput", gen_len=head[0], batch=head[1]) if head else None
        tps = tp["tokens_per_s"] if tp else None
        rel = f"{tps / full_tp:.2f}×" if tps and full_tp else "–"
        out.append([label(key), _fmt(ppl and ppl["ppl"]), _fmt(fid and fid["bleu"], ".1f"),
                    _fmt(fid and fid["rouge_l"], ".3f"), _fmt(fid and fid["bertscore_f1"], ".3f"),
                    _fmt(tps, ".1f"), rel])
        if with_retrieval:
            ret = _first(rows, key, "retrieval")
            out[-1].insert(5, _fmt(ret and ret["retrieval_acc"], ".2f"))
    tp_head = f"tok/s (len {head[0]}, batch {head[1]})" if head else "tok/s"
    head_row = ["method", "PPL ↓", "BLEU ↑", "ROUGE-L ↑", "BERTScore F1 ↑", tp_head, "vs full ↑"]
    if with_retrieval:
        head_row.insert(5, "retrieval ↑")
    return _md(head_row, out)


def throughput_table(rows: list[dict]) -> str:
    tp = [r for r in rows if r["task"] == "throughput"]
    full = {(r["gen_len"], r["batch"]): r["tokens_per_s"] for r in tp if r["policy"] == "full"}
    out = []
    for key in sort_keys(method_key(r) for r in tp):
        for r in sorted((r for r in tp if method_key(r) == key), key=lambda r: (r["gen_len"], r["batch"])):
            ref = full.get((r["gen_len"], r["batch"]))
            rel = f"{r['tokens_per_s'] / ref:.2f}×" if ref and r["tokens_per_s"] else "–"
            ttft_ms = r["ttft_s"] and 1000 * r["ttft_s"]
            out.append([label(key), str(r["gen_len"]), str(r["batch"]), _fmt(r["tokens_per_s"], ".1f"), rel,
                        _fmt(r["decode_tokens_per_s"], ".1f"), _fmt(ttft_ms, ".0f"),
                        _fmt(r["step_ms_mean"], ".1f"), _bytes(r["kv_cache_bytes"]),
                        _bytes(r["peak_mem_bytes"])])
    return _md(["method", "gen len", "batch", "tok/s", "vs full", "decode tok/s", "TTFT ms", "ms/step",
                "KV cache", "peak memory"], out)


def failures(rows: list[dict]) -> str:
    bad = [r for r in rows if r["status"] != "ok"]
    if not bad:
        return "None: every cell finished."
    out = [[r["cell_id"], r["task"], str(r["model"]), label(method_key(r)),
            ((r["error"] or "").splitlines() or [""])[0][:160].replace("|", "\\|")] for r in bad]
    return _md(["cell", "task", "model", "method", "error"], out)


def _max_overlap(spans: list[tuple]) -> int:
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def run_info(rows: list[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    lines = [f"- cells: {len(rows)} ({len(ok)} ok, {len(rows) - len(ok)} failed); "
             f"summed cell time {sum(r['seconds'] or 0 for r in rows) / 60:.1f} min"]
    starts = [r["started_at"] for r in rows if r["started_at"]]
    ends = [r["finished_at"] for r in rows if r["finished_at"]]
    if starts and ends:
        lines.append(f"- first cell started {min(starts):%Y-%m-%d %H:%M} UTC, last finished after "
                     f"{(max(ends) - min(starts)).total_seconds() / 60:.1f} min")
    spans = sorted((r["started_at"], r["finished_at"]) for r in rows if r["started_at"] and r["finished_at"])
    if spans:
        n = _max_overlap(spans)
        lines.append(f"- concurrency: up to {n} cell{'s' if n != 1 else ''} at a time (concurrent cells "
                     "share the machine, which matters for throughput on CPU)")
    seen = sorted({(r["device_name"], r["device"], r["cpu_count"], r["torch_threads"], r["hostname"])
                   for r in ok if r["device"]}, key=str)
    for name, dev, cpus, threads, host in seen:
        lines.append(f"- hardware: {dev} {name} on {host} ({cpus} CPUs, {threads} torch threads per cell)")
    vers = sorted({(r["python"], r["torch"], r["transformers"], r["ray"], r["adore"])
                   for r in ok if r["torch"]}, key=str)
    for py, tch, tf, ray, adore in vers:
        lines.append(f"- versions: python {py}, torch {tch}, transformers {tf}, ray {ray}, "
                     f"adore-cluster {adore}")
    return "\n".join(lines)


def render(rows: list[dict], plots: dict[tuple, list[tuple[str, str]]], title: str) -> str:
    """The whole report. plots: (model, dtype) -> [(caption, file name)]."""
    ok = [r for r in rows if r["status"] == "ok"]
    parts = [f"# {title}", "",
             "Methods in rows, metrics in columns. Quality is measured against full attention's own "
             "generations (BLEU, ROUGE-L, BERTScore F1: 1.0 / 100 = identical); PPL is the perplexity of "
             "streamed held-out text under each method's bounded cache. Throughput is relative to full "
             "attention at the same generation length and batch. Columns are described in jobs/SCHEMA.md.",
             ""]
    for (model, dtype), mrows in by_model(ok).items():
        parts += [f"## {model} ({dtype})", "", summary_table(mrows), ""]
        if any(r["task"] == "throughput" for r in mrows):
            parts += ["### Throughput", "", throughput_table(mrows), ""]
        for caption, name in plots.get((model, dtype), []):
            parts += [f"![{caption}]({name})", ""]
    parts += ["## Failed cells", "", failures(rows), "", "## Run", "", run_info(rows), ""]
    return "\n".join(parts)
