"""The Parquet schema of one result row (one cell). Documented column by column in jobs/SCHEMA.md.

The schema is fixed: every row has every column (null where a task does not measure it), so files
written by different tasks, runs and versions concatenate without unification. Keys a row carries
that the schema does not know go into `extra_json` instead of being dropped. Changing a column's
meaning or type means bumping SCHEMA_VERSION.
"""

from __future__ import annotations

import json

import pyarrow as pa

SCHEMA_VERSION = 1

_S, _I, _F = pa.string(), pa.int64(), pa.float64()
_TS = pa.timestamp("us", tz="UTC")

FIELDS: list[tuple[str, pa.DataType]] = [
    # identity and status
    ("schema_version", pa.int32()), ("cell_id", _S), ("status", _S), ("error", _S), ("attempt", _I),
    ("run_id", _S), ("job_name", _S),
    # configuration
    ("task", _S), ("model", _S), ("dtype", _S), ("policy", _S), ("cache_size", _I), ("top_k", _I),
    ("rebuild", _I), ("rebuild_mode", _S), ("gen_len", _I), ("batch", _I), ("params_json", _S),
    ("policy_options_json", _S), ("data", _S), ("data_sha", _S), ("seed", _I), ("config_json", _S),
    # throughput
    ("tokens_per_s", _F), ("decode_tokens_per_s", _F), ("ttft_s", _F), ("total_s", _F),
    ("prompt_tokens", _I), ("generated_tokens", _I), ("step_ms_mean", _F),
    ("peak_mem_bytes", _I), ("mem_kind", _S), ("kv_cache_bytes", _I),
    ("step_ctx", pa.list_(_I)), ("step_ms", pa.list_(_F)),
    # perplexity
    ("ppl", _F), ("nll", _F), ("ppl_tokens", _I),
    # fidelity to full attention
    ("bleu", _F), ("rouge_l", _F), ("bertscore_f1", _F), ("token_agreement", _F),
    ("prefix_match_tokens", _F), ("n_prompts", _I), ("new_tokens", _I), ("sample_ref", _S),
    ("sample_out", _S),
    # engine counters
    ("steps", _I), ("released", _I), ("rebuilt", _I), ("peak_cache_tokens", _I), ("peak_step_tokens", _I),
    # timing
    ("seconds", _F), ("load_s", _F), ("started_at", _TS), ("finished_at", _TS),
    # hardware and packages
    ("hostname", _S), ("node_id", _S), ("device", _S), ("device_name", _S), ("cpu_model", _S),
    ("cpu_count", _I), ("torch_threads", _I), ("gpu_count", _I), ("platform", _S), ("python", _S),
    ("torch", _S), ("transformers", _S), ("ray", _S), ("adore", _S), ("pyarrow", _S),
    # long-context retrieval (per task x length x depth in retrieval_json); added after version 1's
    # first columns, at the end as the stability rules ask
    ("retrieval_acc", _F), ("retrieval_json", _S),
    ("extra_json", _S),
]
SCHEMA = pa.schema([pa.field(n, t) for n, t in FIELDS])
COLUMNS = [n for n, _ in FIELDS]


def row_table(row: dict) -> pa.Table:
    """A one-row table with exactly SCHEMA; unknown keys are kept as JSON in `extra_json`."""
    known = {k: v for k, v in row.items() if k in SCHEMA.names}
    extra = {k: v for k, v in row.items() if k not in SCHEMA.names}
    if extra:
        prev = json.loads(known.get("extra_json") or "{}")
        known["extra_json"] = json.dumps({**prev, **extra}, default=str, sort_keys=True)
    known.setdefault("schema_version", SCHEMA_VERSION)
    return pa.Table.from_pylist([known], schema=SCHEMA)


def cell_columns(cell: dict) -> dict:
    """The configuration columns of a cell (see grid.expand)."""
    cols = {k: cell.get(k) for k in ("cell_id", "task", "model", "dtype", "policy", "cache_size", "top_k",
                                     "rebuild", "rebuild_mode", "gen_len", "batch", "data", "data_sha",
                                     "seed")}
    cols["params_json"] = json.dumps(cell.get("params", {}), sort_keys=True)
    cols["policy_options_json"] = json.dumps(cell.get("policy_options", {}), sort_keys=True)
    cols["config_json"] = json.dumps(cell, sort_keys=True, default=str)
    return cols
