"""Long-context retrieval (adore/retrieval.py): passkey, needle-in-a-haystack (one and several keys)
and variable tracking, prompts of several lengths with the needle at several depths, generated from
the cell's text (seeded), answered greedily under the policy.

Columns: retrieval_acc (mean score over every sample) and retrieval_json, the mean score of each
(task, length, depth) as a list of {"task", "length", "depth", "acc", "n"} records (the report's heat
maps). A prompt longer than the model's context is not generated: lengths past it are left out.
"""

from __future__ import annotations

import json

from adore.retrieval import MAX_ANSWER_TOKENS, answer, make_samples, mean_accuracy

from ..sources import as_text


def run(ctx, cell: dict) -> dict:
    p = cell["params"]
    limit = getattr(ctx.model.config, "max_position_embeddings", None) or 1 << 30
    lengths = [n for n in p["lengths"] if n + MAX_ANSWER_TOKENS <= limit]
    key = ("retrieval-samples", cell["model"], cell["data_sha"], cell["data"], json.dumps(p, sort_keys=True))
    samples = ctx.memo(key, lambda: make_samples(ctx.tok, as_text(ctx.source(cell["data"])), tasks=p["kinds"],
                                                 lengths=lengths, depths=p["depths"], per_cell=p["per_cell"],
                                                 seed=cell.get("seed") or 0))
    records, stats = answer(ctx.model, ctx.tok, ctx.info, lambda: ctx.policy(cell), samples, p["batch"])
    return {"retrieval_acc": mean_accuracy(records), "retrieval_json": json.dumps(records),
            "n_prompts": len(samples), "prompt_tokens": max((len(s.prompt_ids) for s in samples), default=0),
            **stats}
