"""Text and prompt sources for the quality and throughput tasks.

A source spec is one string:
  austen:<novel>        a slice shipped in data/austen/ (northangerabbey is the held-out novel)
  PATH or URI .txt/.md  one plain text (streamed for perplexity, sliced into prompts)
  PATH or URI .jsonl    one JSON object per line; its "prompt" (else "text") field is one prompt
  PATH or URI .parquet  a "prompt" (else "text") column, one prompt per row

The driver loads each source once and ships it to the workers through Ray's object store, so the files
need to exist only where the job's driver runs. URIs go through pyarrow.fs (s3://, gs://, file://).
A loaded source is {"kind": "text", "text": str} or {"kind": "prompts", "prompts": [str, ...]}.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from adore.config import UserError
from adore.evaluation import spread_spans

AUSTEN_DIRS = (Path(__file__).resolve().parents[1] / "data" / "austen", Path.cwd() / "data" / "austen")


def _read_bytes(spec: str) -> bytes:
    if "://" in spec:
        import pyarrow.fs as pafs

        try:
            fs, path = pafs.FileSystem.from_uri(spec)
            with fs.open_input_stream(path) as f:
                return f.read()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {spec}: {e}") from None
    p = Path(spec)
    if not p.is_file():
        raise UserError(f"data file not found: {spec}")
    return p.read_bytes()


def _prompts_from_records(records: list[dict], spec: str) -> list[str]:
    out = []
    for i, r in enumerate(records):
        text = r.get("prompt", r.get("text")) if isinstance(r, dict) else None
        if not isinstance(text, str):
            raise UserError(f"{spec}: record {i} has no string 'prompt' or 'text' field")
        out.append(text)
    if not out:
        raise UserError(f"{spec} holds no prompts")
    return out


def load_source(spec: str) -> dict:
    """Load one source spec (see the module doc)."""
    if spec.startswith("austen:"):
        name = spec.split(":", 1)[1]
        for d in AUSTEN_DIRS:
            if (d / f"{name}.txt").is_file():
                return {"kind": "text", "text": (d / f"{name}.txt").read_text(encoding="utf-8")}
        raise UserError(f"no shipped text {name!r} (looked in {', '.join(map(str, AUSTEN_DIRS))})")
    data = _read_bytes(spec)
    suffix = spec.rsplit(".", 1)[-1].lower() if "." in spec else ""
    if suffix == "jsonl":
        try:
            records = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise UserError(f"{spec} is not valid JSONL: {e}") from None
        return {"kind": "prompts", "prompts": _prompts_from_records(records, spec)}
    if suffix == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        col = "prompt" if "prompt" in table.column_names else "text"
        if col not in table.column_names:
            raise UserError(f"{spec} has no 'prompt' or 'text' column")
        return {"kind": "prompts", "prompts": _prompts_from_records(
            [{"prompt": v} for v in table.column(col).to_pylist()], spec)}
    return {"kind": "text", "text": data.decode("utf-8", errors="replace")}


def source_sha(source: dict) -> str:
    """12-hex content hash: a changed file gives new cell ids instead of silently mixing results."""
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:12]


def as_text(source: dict) -> str:
    """One text to stream (prompt lists are joined by blank lines)."""
    return source["text"] if source["kind"] == "text" else "\n\n".join(source["prompts"])


def prompt_ids(source: dict, tok, n: int, prompt_tokens: int) -> list[list[int]]:
    """n prompts as token ids. A text is cut into n slices of prompt_tokens tokens at evenly spaced
    offsets from its start to its end (adore.evaluation.spread_spans); a prompt list gives its first
    n prompts (each cut to its last prompt_tokens tokens)."""
    if source["kind"] == "prompts":
        prompts = [tok.encode(p) for p in source["prompts"][:n]]
        return [p[-prompt_tokens:] for p in prompts if p]
    ids = tok.encode(source["text"], add_special_tokens=False)
    return spread_spans(ids, n, prompt_tokens, reach_end=True, name=f"the text (prompt_tokens={prompt_tokens})")
