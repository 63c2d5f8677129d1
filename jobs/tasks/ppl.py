"""Perplexity of streamed text under the policy's bounded cache (teacher forcing, one token a step).

The text is tokenized without special tokens and cut to `tokens` tokens from `offset`; the engine then
predicts each next token while it holds at most the policy's budget (adore.cli.perplexity).
"""

from __future__ import annotations

from adore.cli import perplexity
from adore.config import UserError
from adore.engine import Engine

from ..sources import as_text


def run(ctx, cell: dict) -> dict:
    p = cell["params"]
    text = as_text(ctx.source(cell["data"]))
    ids = ctx.tok.encode(text, add_special_tokens=False)[p["offset"] : p["offset"] + p["tokens"]]
    if len(ids) < p["tokens"]:
        raise UserError(f"{cell['data']} has only {len(ids)} tokens after offset {p['offset']}, "
                        f"{p['tokens']} asked")
    engine = Engine(ctx.model, ctx.tok, ctx.policy(cell), info=ctx.info, max_batch=1, max_seq_len=len(ids) + 1)
    res = perplexity(engine, ids, progress=False)
    return {"ppl": res["ppl"], "nll": res["nll"], "ppl_tokens": res["tokens"], "total_s": res["seconds"],
            "tokens_per_s": res["tokens_per_s"], **ctx.engine_stats(engine)}
