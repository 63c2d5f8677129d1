"""jobs/sources.py, jobs/tasks/*: sources, BERTScore, and each task on random:tiny (issue 5)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adore.config import UserError
from adore.models import ByteTokenizer
from jobs.grid import expand, validate
from jobs.runner import CellRunner
from jobs.sources import as_text, load_source, prompt_ids, source_sha


@pytest.fixture(autouse=True)
def one_thread():
    """As in a Ray worker with one CPU (and much faster than 2 threads on a busy 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sources(tmp_path):
    austen = load_source("austen:northangerabbey")
    assert austen["kind"] == "text" and "Catherine" in austen["text"]
    lines = [json.dumps({"prompt": f"prompt {i}"}) for i in range(3)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "t.txt").write_text("plain text")
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "p.parquet")
    jl = load_source(str(tmp_path / "p.jsonl"))
    assert jl == {"kind": "prompts", "prompts": ["prompt 0", "prompt 1", "prompt 2"]}
    assert load_source(str(tmp_path / "p.parquet"))["prompts"] == ["a", "b"]
    assert load_source(f"file://{tmp_path}/t.txt") == {"kind": "text", "text": "plain text"}
    assert as_text(jl) == "prompt 0\n\nprompt 1\n\nprompt 2"
    assert source_sha(jl) != source_sha(load_source(str(tmp_path / "p.parquet")))
    tok = ByteTokenizer(320)
    assert prompt_ids(jl, tok, 2, 4) == [tok.encode("pt 0"), tok.encode("pt 1")]
    slices = prompt_ids({"kind": "text", "text": "abcdefghij"}, tok, 3, 4)
    assert [tok.decode(s) for s in slices] == ["abcd", "defg", "ghij"]
    for bad in ("austen:nope", str(tmp_path / "missing.txt")):
        with pytest.raises(UserError):
            load_source(bad)
    (tmp_path / "bad.jsonl").write_text('{"other": 1}\n')
    with pytest.raises(UserError, match="prompt"):
        load_source(str(tmp_path / "bad.jsonl"))


def test_bertscore_with_the_packaged_encoder():
    from adore.evaluation import BertScorer

    s = BertScorer()
    same, para, other, empty = s.f1(
        ["The cat sat on the mat.", "A cat was sitting on the mat.", "Stock prices fell sharply today.", ""],
        ["The cat sat on the mat."] * 3 + [""])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < other < para < same
    assert empty == 1.0 and s.f1([""], ["text"]) == [0.0]


def test_tasks_on_a_tiny_model():
    cfg = validate({"models": ["random:tiny"], "policies": ["full", "window", "adore"], "cache_sizes": [16],
                    "top_k": 8, "rebuilds": [2], "gen_lengths": [24], "batch_sizes": [2],
                    "tasks": {"throughput": {"prompt_tokens": 16}, "ppl": {"tokens": 48},
                              "fidelity": {"prompts": 2, "prompt_tokens": 24, "new_tokens": 16, "batch": 2}}})
    sources = {cfg["data"]: load_source(cfg["data"])}
    runner = CellRunner(sources)
    rows = {(c["task"], c["policy"]): runner.run(c) for c in expand(cfg)}
    assert all(r["status"] == "ok" for r in rows.values()), [r["error"] for r in rows.values()]
    full_fid = rows[("fidelity", "full")]  # full attention against itself: identical
    assert full_fid["token_agreement"] == 1.0 and full_fid["rouge_l"] == 1.0
    assert full_fid["bertscore_f1"] == pytest.approx(1.0, abs=1e-5) and full_fid["prefix_match_tokens"] == 16
    win = rows[("fidelity", "window")]
    assert win["released"] > 0 and 0 <= win["token_agreement"] <= 1 and win["n_prompts"] == 2
    tp = rows[("throughput", "window")]
    assert tp["generated_tokens"] == 48 and tp["tokens_per_s"] > 0 and tp["decode_tokens_per_s"] > 0
    assert 0 < len(tp["step_ms"]) == len(tp["step_ctx"]) <= 64 and tp["peak_cache_tokens"] <= 16
    assert rows[("throughput", "full")]["kv_cache_bytes"] > tp["kv_cache_bytes"]
    assert rows[("throughput", "adore")]["peak_cache_tokens"] <= 16
    assert rows[("ppl", "window")]["ppl_tokens"] == 47 and rows[("ppl", "window")]["peak_cache_tokens"] <= 16
    assert rows[("ppl", "full")]["released"] == 0 and rows[("ppl", "adore")]["released"] > 0
    assert runner.run({**expand(cfg)[0], "params": {"prompt_tokens": 10**6}})["status"] == "error"


def test_byte_tokenizer_shows_ids_past_the_bytes():
    tok = ByteTokenizer(320)
    assert tok.decode([1, *tok.encode("hé"), 300, 2]) == "hé<300>"
    assert tok.decode([1, 300], skip_special_tokens=False) == "<1><300>"
