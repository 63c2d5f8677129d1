"""Long-context retrieval (adore/retrieval.py): passkey, needle-in-a-haystack (one and several keys)
and variable tracking, prompts of several lengths with the needle at several depths, generated from
the cell's text (seeded), answered greedily under the policy.

Columns: retrieval_acc (mean score over every sample) and retrieval_json, the mean score of each
(task, length, depth) as a list of {"task", "length", "depth", "acc", "n"} records (the report's heat
maps). A prompt longer than the model's context is not generated: lengths past it are left out.
"""

from __future__ import annotations

import json
from collections import defaultdict

from adore.config import SamplingParams
from adore.engine import Engine
from adore.retrieval import MAX_ANSWER_TOKENS, make_samples, score

from ..sources import as_text


def run(ctx, cell: dict) -> dict:
    p = cell["params"]
    limit = getattr(ctx.model.config, "max_position_embeddings", None) or 1 << 30
    lengths = [n for n in p["lengths"] if n + MAX_ANSWER_TOKENS <= limit]
    key = ("retrieval-samples", cell["model"], cell["data_sha"], cell["data"], json.dumps(p, sort_keys=True))
    samples = ctx.memo(key, lambda: make_samples(ctx.tok, as_text(ctx.source(cell["data"])), tasks=p["kinds"],
                                                 lengths=lengths, depths=p["depths"], per_cell=p["per_cell"],
                                                 seed=cell.get("seed") or 0))
    scores = []
    steps = {"steps": 0, "released": 0, "rebuilt": 0}
    for ask in lengths:  # one engine per length, its rows sized for it
        group = [s for s in samples if s.target == ask]
        if not group:
            continue
        engine = Engine(ctx.model, ctx.tok, ctx.policy(cell), max_batch=min(p["batch"], len(group)),
                        max_seq_len=max(len(s.prompt_ids) for s in group) + MAX_ANSWER_TOKENS)
        outs = engine.generate([s.prompt_ids for s in group], SamplingParams(max_tokens=MAX_ANSWER_TOKENS))
        scores += [(s, ask, score(s, o.text)) for s, o in zip(group, outs)]
        for k in steps:
            steps[k] += engine.stats.get(k, 0)
    cells: dict[tuple, list[float]] = defaultdict(list)
    for s, ask, acc in scores:
        cells[(s.task, ask, s.depth)].append(acc)
    records = [{"task": t, "length": n, "depth": d, "acc": sum(v) / len(v), "n": len(v)}
               for (t, n, d), v in sorted(cells.items())]
    return {"retrieval_acc": sum(a for _, _, a in scores) / max(len(scores), 1),
            "retrieval_json": json.dumps(records), "n_prompts": len(scores),
            "prompt_tokens": max((len(s.prompt_ids) for s in samples), default=0), **steps}

