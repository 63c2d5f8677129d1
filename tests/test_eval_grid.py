"""jobs/grid.py: presets load, the grid expands as configured, cell ids are stable (issue 5)."""

from __future__ import annotations

import pytest

from adore.config import UserError
from jobs.grid import cell_id, describe_cell, expand, load_config, preset_names, validate

BASE = {"models": ["random:tiny"], "policies": ["full", "window", "adore"], "cache_sizes": [16, 32],
        "top_k": 8, "rebuilds": [2, 4], "gen_lengths": [8, 16, 32], "batch_sizes": [1, 2]}


def _count(cells, **match):
    return sum(all(c[k] == v for k, v in match.items()) for c in cells)


def test_presets_load_and_expand(monkeypatch):
    assert {"ci", "smoke", "paper"} <= set(preset_names())
    for name in ("ci", "smoke"):
        cells = expand(load_config(name))
        assert cells and len({c["cell_id"] for c in cells}) == len(cells)
    with pytest.raises(UserError, match="LLAMA2_7B"):
        load_config("paper")  # the checkpoint path comes from the environment or --models
    monkeypatch.setenv("LLAMA2_7B", "/ckpt/llama-2-7b")
    paper = load_config("paper")
    assert paper["models"] == ["/ckpt/llama-2-7b"] and paper["cache_sizes"] == [192]
    assert paper["top_k"] == 96 and paper["rebuilds"] == [8] and max(paper["gen_lengths"]) == 4096
    cells = expand(paper)
    assert {c["policy"] for c in cells} == {"full", "window", "strided", "sink", "h2o", "adore",
                                            "adore-norebuild", "adore-nocontroller"}
    assert load_config("paper", overrides={"models": ["/x"]})["models"] == ["/x"]


def test_grid_expands_as_configured():
    cfg = validate({**BASE, "tasks": {"throughput": {}, "ppl": {}, "fidelity": {}}})
    cells = expand(cfg)
    tp = [c for c in cells if c["task"] == "throughput"]
    # methods: full (no budget), window x 2 budgets, adore x 2 budgets x 2 R = 7; x 3 lengths x 2 batches
    assert len(tp) == 7 * 3 * 2
    assert _count(tp, policy="full") == 6 and _count(tp, policy="window") == 12
    assert _count(tp, policy="adore") == 24
    for task in ("ppl", "fidelity"):  # no length / batch axes for quality tasks
        q = [c for c in cells if c["task"] == task]
        assert len(q) == 7 and all(c["gen_len"] is None and c["batch"] is None for c in q)
    full = [c for c in cells if c["policy"] == "full"]
    assert all(c["cache_size"] is None and c["top_k"] is None and c["rebuild"] == 0 for c in full)
    window = [c for c in cells if c["policy"] == "window"]
    assert all(c["top_k"] is None and c["rebuild"] == 0 and c["rebuild_mode"] is None for c in window)
    adore = [c for c in cells if c["policy"] == "adore"]
    assert {(c["cache_size"], c["rebuild"]) for c in adore} == {(16, 2), (16, 4), (32, 2), (32, 4)}
    assert all(c["top_k"] == 8 and c["rebuild_mode"] == "promote" for c in adore)
    assert len({c["cell_id"] for c in cells}) == len(cells) == 42 + 14


def test_task_overrides_modes_and_ablations():
    cfg = validate({**BASE, "policies": ["adore", "adore-norebuild", "sink"],
                    "rebuild_modes": ["every", "promote"],
                    "tasks": {"throughput": {"cache_sizes": [16], "gen_lengths": [8], "batch_sizes": [4]},
                              "ppl": {"tokens": 64, "data": "tests/x.txt"}}})
    cells = expand(cfg)
    tp = [c for c in cells if c["task"] == "throughput"]
    assert {c["cache_size"] for c in tp} == {16} and {(c["gen_len"], c["batch"]) for c in tp} == {(8, 4)}
    # adore: 2 R x 2 modes; adore-norebuild: R=0, no mode; sink: 1
    assert len(tp) == 4 + 1 + 1
    nr = [c for c in cells if c["policy"] == "adore-norebuild"]
    assert all(c["rebuild"] == 0 and c["rebuild_mode"] is None for c in nr)
    assert all(c["policy_options"] == {"sink_tokens": 4} for c in cells if c["policy"] == "sink")
    ppl = [c for c in cells if c["task"] == "ppl"]
    assert len(ppl) == 2 * (4 + 1 + 1)
    assert all(c["data"] == "tests/x.txt" and c["params"] == {"tokens": 64, "offset": 0} for c in ppl)


def test_fractional_top_k_follows_the_budget():
    cells = expand(validate({**BASE, "top_k": 0.5, "tasks": ["ppl"]}))
    assert {(c["cache_size"], c["top_k"]) for c in cells if c["policy"] == "adore"} == {(16, 8), (32, 16)}


def test_cell_ids_are_stable_and_config_sensitive():
    cfg = validate({**BASE, "tasks": ["ppl"]})
    a, b = expand(cfg), expand(validate({**BASE, "tasks": ["ppl"]}))
    assert [c["cell_id"] for c in a] == [c["cell_id"] for c in b]
    assert all(c["cell_id"] == cell_id(c) for c in a)
    c0 = dict(a[0])
    assert cell_id({**c0, "data_sha": "other"}) != c0["cell_id"]
    assert cell_id({**c0, "params": {"tokens": 1, "offset": 0}}) != c0["cell_id"]
    # a pinned id: changing how cells are hashed would silently orphan every stored result
    pinned = {"task": "ppl", "model": "random:tiny", "dtype": "float32", "policy": "window", "cache_size": 16,
              "top_k": None, "rebuild": 0, "rebuild_mode": None, "policy_options": {}, "gen_len": None,
              "batch": None, "params": {"offset": 0, "tokens": 2048}, "data": "austen:northangerabbey",
              "data_sha": None, "seed": 0}
    assert cell_id(pinned) == cell_id(dict(reversed(list(pinned.items()))))
    assert cell_id(pinned) == "f8495413872585a3"
    assert "window m=16" in describe_cell(pinned)


@pytest.mark.parametrize("bad, msg", [
    ({"policies": ["nope"]}, "unknown policy"),
    ({"cache_sizes": [0]}, "cache_sizes"),
    ({"rebuilds": [-1]}, "rebuilds"),
    ({"rebuild_modes": ["always"]}, "rebuild mode"),
    ({"tasks": {"bleu": {}}}, "unknown task"),
    ({"tasks": {"ppl": {"tokenz": 3}}}, "unknown ppl parameters"),
    ({"tasks": {"ppl": {"offset": -1}}}, "offset"),
    ({"dtype": "int8"}, "dtype"),
    ({"top_k": 1.5}, "top_k"),
    ({"modles": ["x"]}, "unknown config keys"),
])
def test_config_mistakes_are_user_errors(bad, msg):
    with pytest.raises(UserError, match=msg):
        validate({**BASE, **bad})
