"""Generation fidelity to full attention: the same prompts, greedy, under the policy and under full.

Metrics compare the policy's generations (candidates) with full attention's (references), scored by
adore/evaluation.py (bench/quality.py scores with the same functions):
  bleu                 sacrebleu corpus BLEU (0-100)
  rouge_l              mean ROUGE-L F-measure (rouge-score, stemming on), 0-1
  bertscore_f1         mean BERTScore F1 with the packaged MiniLM encoder, 0-1
  token_agreement      mean share of positions where the two token sequences agree, 0-1
  prefix_match_tokens  mean number of leading tokens identical to the reference
Generations ignore EOS so that every one has exactly `new_tokens` tokens. The full-attention
references are computed once per worker for each (model, prompts, length) and reused by every policy.
"""

from __future__ import annotations

from adore.config import SamplingParams
from adore.engine import Engine
from adore.evaluation import text_scores

from ..sources import prompt_ids


def _generate(ctx, cell: dict, prompts: list[list[int]], policy) -> tuple[list, Engine]:
    p = cell["params"]
    engine = Engine(ctx.model, ctx.tok, policy, info=ctx.info, max_batch=min(p["batch"], len(prompts)),
                    max_seq_len=max(len(x) for x in prompts) + p["new_tokens"])
    outs = engine.generate(prompts, SamplingParams(max_tokens=p["new_tokens"], ignore_eos=True))
    return outs, engine


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run(ctx, cell: dict) -> dict:
    p = cell["params"]
    prompts = prompt_ids(ctx.source(cell["data"]), ctx.tok, p["prompts"], p["prompt_tokens"])
    key = ("fidelity-ref", cell["model"], cell["dtype"], cell["data_sha"], cell["data"],
           p["prompts"], p["prompt_tokens"], p["new_tokens"])
    refs = ctx.memo(key, lambda: _generate(ctx, cell, prompts, ctx.full_policy())[0])
    outs, engine = _generate(ctx, cell, prompts, ctx.policy(cell))
    hyp_text, ref_text = [o.text for o in outs], [r.text for r in refs]
    scores = text_scores(hyp_text, ref_text, ctx.bert_scorer())
    agree = [sum(a == b for a, b in zip(o.token_ids, r.token_ids)) / max(len(r.token_ids), 1)
             for o, r in zip(outs, refs)]
    n = len(outs)
    return {
        "bleu": scores["bleu"], "rouge_l": sum(scores["rouge_l"]) / n,
        "bertscore_f1": sum(scores["bertscore_f1"]) / n, "token_agreement": sum(agree) / n,
        "prefix_match_tokens": sum(_prefix(o.token_ids, r.token_ids) for o, r in zip(outs, refs)) / n,
        "n_prompts": n, "new_tokens": p["new_tokens"], "prompt_tokens": max(len(x) for x in prompts),
        "generated_tokens": sum(len(o.token_ids) for o in outs),
        "sample_ref": ref_text[0][:500], "sample_out": hyp_text[0][:500], **ctx.engine_stats(engine),
    }
