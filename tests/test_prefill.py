"""Batched, chunked prefill: the prompts a step admits go through one packed forward (block-diagonal
causal attention), a prompt longer than max_prefill_tokens is chunked in over steps, and neither
changes a token or a log-probability: packed == one prompt at a time == chunked, for every policy."""

from __future__ import annotations

import pytest
import torch

import adore.engine
from adore import AdoreConfig, SamplingParams, UserError
from adore.attention import PromptKV, _query_blocks, forward_prompt, forward_prompts
from adore.engine import Engine
from adore.policies import make_policy, policy_names

PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 40, 9, 25, 1)]  # budget 16: some are cut at prefill
CFG = dict(cache_size=16, top_k=8, rebuild=4)
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)


def _ids(T, seed):
    return torch.randint(3, 250, (T,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["tiny", "tiny_gqa"])
def model_tok(request):
    return request.getfixturevalue(request.param)


def run(model, tok, name, prompts, params=PARAMS, prefill_top_k=None, cfg=None, **engine_kw):
    """Generate; returns the results and the number of packed prefill forwards of each step."""
    eng = Engine(model, tok, make_policy(name, AdoreConfig(**(cfg or CFG))), max_seq_len=128, **engine_kw)
    if prefill_top_k is not None:  # as for a model fine-tuned under top-K (tests/test_train.py: how it is found)
        eng.prefill_top_k = prefill_top_k
    per_step, real = [0], adore.engine.forward_prompts

    def counted(*a, **kw):
        per_step[-1] += 1
        return real(*a, **kw)

    adore.engine.forward_prompts = counted
    try:
        outs = eng.generate(prompts, params, progress=lambda _: per_step.append(0))
    finally:
        adore.engine.forward_prompts = real
    per_step.pop()  # the count of the step that was never run
    assert eng.stats["prefill_tokens"] == sum(len(p) for p in prompts)
    return outs, per_step


def alone(model, tok, name, prompts, **kw):
    return [run(model, tok, name, [p], max_batch=1, **kw)[0][0] for p in prompts]


def assert_same(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.finish_reason == b.finish_reason


def test_forward_prompts_packed_and_chunked_equal_one_prompt_each(tiny_gqa):
    """Hidden states, K/V in every layer and attention mass of prompts packed together, in chunks,
    and with the attention cut into many query blocks equal forward_prompt's of each prompt alone."""
    model, _, _ = tiny_gqa
    prompts = [_ids(n, seed=n) for n in (1, 7, 30, 12, 3)]
    for top_k, want_mass in [(None, False), (None, True), (4, False), (4, True)]:
        ref = [forward_prompt(model, p[None], want_mass=want_mass, top_k=top_k) for p in prompts]
        # (chunk rows, max_scores, alone): one block; many; chunks in blocks of their own, lower-right causal
        for chunk, max_scores, alone in [(None, 1 << 25, 256), (None, 300, 256), (5, 64, 256), (7, 1, 256),
                                         (None, 1 << 25, 7), (5, 300, 5), (None, 64, 3)]:
            kvs = [PromptKV.new(p, want_mass) for p in prompts]
            hidden = [[] for _ in prompts]
            while any(kv.done < len(kv.ids) for kv in kvs):
                todo = [(i, min(len(kv.ids) - kv.done, chunk or len(kv.ids))) for i, kv in enumerate(kvs)
                        if kv.done < len(kv.ids)]
                x = forward_prompts(model, [(kvs[i], n) for i, n in todo], top_k=top_k, max_scores=max_scores,
                                    alone=alone)
                for (i, _), h in zip(todo, x[0].split([n for _, n in todo])):
                    hidden[i].append(h)
            for (h, ks, vs, mass), kv, got in zip(ref, kvs, hidden):
                assert torch.allclose(torch.cat(got), h[0], atol=1e-5)
                assert torch.allclose(kv.k, torch.cat(ks), atol=1e-5) and torch.allclose(kv.v, torch.cat(vs), atol=1e-5)
                assert (kv.mass is None) == (mass is None)
                if mass is not None:
                    assert torch.allclose(kv.mass, mass[0], atol=1e-4)


@pytest.mark.parametrize("cut", ["mean", "max"])
def test_prompt_cut_rules_give_the_same_tokens_packed_chunked_and_alone(tiny_gqa, cut):
    """adore's cut of prompts longer than the budget by either rule: packed == chunked == alone; the
    two rules keep different positions for some prompt."""
    model, tok, _ = tiny_gqa
    cfg = {**CFG, "prompt_cut": cut}
    want = alone(model, tok, "adore", PROMPTS, cfg=cfg)
    assert_same(run(model, tok, "adore", PROMPTS, max_batch=6, cfg=cfg)[0], want)
    assert_same(run(model, tok, "adore", PROMPTS, max_batch=3, max_prefill_tokens=5, cfg=cfg)[0], want)
    if cut == "max":
        mean = alone(model, tok, "adore", PROMPTS, cfg={**CFG, "prompt_cut": "mean"})
        assert any(a.token_ids != b.token_ids or a.logprobs != b.logprobs for a, b in zip(mean, want))


def test_query_blocks_stay_within_the_bound():
    """Blocks cover the rows in order, each with rows x keys <= the bound (or one row), and are maximal."""
    spans = [(0, 3), (5, 4), (0, 2), (30, 9), (0, 1)]  # (done, n): earlier chunks' keys and new rows

    def cells(a, b):
        keys, off = 0, 0
        for done, n in spans:  # a prompt's keys: up to the block's last row of it
            if off < b and off + n > a:
                keys += done + min(b, off + n) - off
            off += n
        return (b - a) * keys

    T = sum(n for _, n in spans)
    for bound in (1, 20, 50, 200, 10**6):
        blocks = _query_blocks(spans, bound)
        assert [a for a, _ in blocks] == [0] + [b for _, b in blocks[:-1]] and blocks[-1][1] == T
        for a, b in blocks:
            assert b - a == 1 or cells(a, b) <= bound
            assert b == T or cells(a, b + 1) > bound
    assert _query_blocks(spans, 10**6) == [(0, T)]


@pytest.mark.parametrize("name", policy_names())
def test_packed_and_chunked_prefill_equal_one_prompt_at_a_time(model_tok, name):
    """Six prompts (1-40 tokens, budget 16) admitted in one step go through ONE forward; chunked at
    7 tokens a step (rows join while others decode) and at 5 with the 40-token prompt first: the
    same greedy tokens and log-probabilities as each prompt prefilled and decoded alone."""
    model, tok, _ = model_tok
    want = alone(model, tok, name, PROMPTS)
    packed, per_step = run(model, tok, name, PROMPTS, max_batch=6)
    assert per_step[0] == 1 and sum(per_step) == 1
    assert_same(packed, want)
    chunked, per_step = run(model, tok, name, PROMPTS, max_batch=3, max_prefill_tokens=7)
    assert max(per_step) == 1
    assert_same(chunked, want)
    order = [2, 0, 4, 1, 3, 5]
    chunked, _ = run(model, tok, name, [PROMPTS[i] for i in order], max_batch=4, max_prefill_tokens=5)
    assert_same(chunked, [want[i] for i in order])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["adore", "h2o", "full"])
def test_packed_and_chunked_prefill_cuda(name):
    """On a GPU (fused SDPA kernels for the padded batches and blocks, Triton copies and scorer at the
    placement), fp32: packed and chunked == one prompt at a time."""
    from adore.models import load_model

    torch.backends.cuda.matmul.allow_tf32 = False
    model, tok, _ = load_model("random:tiny-gqa", device="cuda")
    want = alone(model, tok, name, PROMPTS)
    assert_same(run(model, tok, name, PROMPTS, max_batch=6)[0], want)
    assert_same(run(model, tok, name, PROMPTS, max_batch=3, max_prefill_tokens=7)[0], want)


def test_prefill_top_k_packed_and_chunked(model_tok):
    """The top-K prefill (a model fine-tuned under top-K attention): each row keeps its top K keys
    per head among its own prompt's, packed or chunked alike."""
    model, tok, _ = model_tok
    want = alone(model, tok, "adore", PROMPTS, prefill_top_k=4)
    dense = alone(model, tok, "adore", PROMPTS[2:3])
    assert want[2].logprobs != pytest.approx(dense[0].logprobs, abs=1e-4)  # top-K does apply
    assert_same(run(model, tok, "adore", PROMPTS, prefill_top_k=4, max_batch=6)[0], want)
    assert_same(run(model, tok, "adore", PROMPTS, prefill_top_k=4, max_batch=3, max_prefill_tokens=7)[0], want)


def test_running_rows_decode_every_step_while_a_long_prompt_is_chunked_in(tiny):
    model, tok, _ = tiny
    eng = Engine(model, tok, make_policy("h2o", AdoreConfig(**CFG)), max_batch=2, max_seq_len=128,
                 max_prefill_tokens=6)
    short = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=30, ignore_eos=True))
    eng.step()
    long = eng.add_request(PROMPTS[2], PARAMS)  # 40 tokens: 7 steps of 6
    for i in range(7):
        tokens = [o.request_id for o in eng.step() if o.token_id is not None]
        assert tokens == ([short] if i < 6 else [long, short, long])  # the long one's first, then decode
        assert eng.n_active == 1 + (i == 6) and list(eng.waiting) == [long] * (i < 6)
    assert eng.requests[long].kv is None  # the staging is dropped once the prompt is in its row
    with pytest.raises(UserError, match="max_prefill_tokens"):
        Engine(model, tok, make_policy("full"), max_prefill_tokens=0)


def test_a_failing_prefill_ends_alone_packed_or_chunked(tiny, monkeypatch):
    """A prompt whose forward fails ends with "error", whether it shared the packed forward with others
    (then each runs alone to find it) or failed in a later chunk; the others decode as they would
    alone, an aborted half-prefilled request frees its row, and the engine goes on."""
    model, tok, _ = tiny
    poison = 300
    real = adore.engine.forward_prompts

    def fragile(m, chunks, **kw):
        if any(poison in kv.ids[kv.done : kv.done + n].tolist() for kv, n in chunks):
            raise RuntimeError("forward exploded")
        return real(m, chunks, **kw)

    want = alone(model, tok, "adore", PROMPTS[:4])
    monkeypatch.setattr(adore.engine, "forward_prompts", fragile)
    bad_early, bad_late = [5, poison, 6], list(range(5, 30)) + [poison]
    for max_prefill in (4096, 7):
        eng = Engine(model, tok, make_policy("adore", AdoreConfig(**CFG)), max_batch=3, max_seq_len=128,
                     max_prefill_tokens=max_prefill)
        rids = [eng.add_request(p, PARAMS) for p in (PROMPTS[0], bad_early, PROMPTS[1], bad_late, PROMPTS[2])]
        gone = eng.add_request(PROMPTS[3], PARAMS)
        errors, aborted = [], False
        while eng.has_work():
            errors += [o for o in eng.step() if o.finish_reason == "error"]
            if not aborted and eng.requests[rids[4]].kv is not None:  # half in: abort it, then re-add
                aborted = eng.abort(rids[4])
                rids[4] = eng.add_request(PROMPTS[2], PARAMS)
        assert sorted(o.request_id for o in errors) == sorted([rids[1], rids[3]]) and aborted == (max_prefill == 7)
        assert all("forward exploded" in o.error for o in errors)
        assert_same([eng.result(r) for r in (rids[0], rids[2], rids[4], gone)], want)
        assert eng.n_active == 0 and not eng.waiting


def test_prompts_within_the_budget_are_placed_together_and_a_failing_one_ends_alone(tiny, monkeypatch):
    """The prompts within the budget that a step finishes take their rows in one batched placement (one
    policy call for all); if it fails, each is placed alone, so that only the request whose placement
    fails ends with "error" and the others decode as they would alone."""
    model, tok, _ = tiny
    short = [p for p in PROMPTS if len(p) <= CFG["cache_size"]]  # 3, 9 and 1 tokens: placed whole
    want = alone(model, tok, "adore", short)
    calls = []
    real = type(make_policy("adore")).prefill_scores

    def scores(self, cache, rows, lengths, *a, **kw):
        calls.append(list(lengths))
        if 13 in lengths:
            raise RuntimeError("placement exploded")
        return real(self, cache, rows, lengths, *a, **kw)

    monkeypatch.setattr(type(make_policy("adore")), "prefill_scores", scores)
    got, _ = run(model, tok, "adore", short, max_batch=4)
    assert calls == [[3, 9, 1]]  # one call for the three
    assert_same(got, want)
    calls.clear()
    eng = Engine(model, tok, make_policy("adore", AdoreConfig(**CFG)), max_batch=4, max_seq_len=128)
    rids = [eng.add_request(p, PARAMS) for p in [short[0], list(range(20, 33)), *short[1:]]]
    errors = []
    while eng.has_work():
        errors += [o for o in eng.step() if o.finish_reason == "error"]
    assert [o.request_id for o in errors] == [rids[1]] and "placement exploded" in errors[0].error
    assert calls == [[3, 13, 9, 1], [3], [13], [9], [1]]  # the batch, then each alone
    assert_same([eng.result(r) for r in rids[:1] + rids[2:]], want)
    assert eng.n_active == 0 and not eng.waiting


@pytest.mark.slow
def test_smollm2_packed_and_chunked_prefill(smollm2):
    """The real model: four prompts of 5-70 tokens, packed and chunked at 16 tokens a step (h2o,
    whose prefill cut reads the attention mass), give the tokens of one prompt at a time."""
    model, tok, _ = smollm2
    text = open("data/austen/emma.txt").read()[:4000]
    ids = tok.encode(text)
    prompts = [ids[:70], ids[100:105], ids[200:245], ids[300:321]]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    want = alone(model, tok, "h2o", prompts, params=params)
    assert_same(run(model, tok, "h2o", prompts, params, max_batch=4)[0], want)
    assert_same(run(model, tok, "h2o", prompts, params, max_batch=2, max_prefill_tokens=16)[0], want)


def test_query_blocks_keep_long_chunks_alone():
    """A chunk of >= `alone` rows shares no block with another prompt; short ones still pack together;
    skipped chunks are in no block."""
    spans = [(0, 3), (5, 4), (0, 2), (30, 9), (0, 1)]  # rows 0-2, 3-6, 7-8, 9-17, 18
    assert _query_blocks(spans, 10**6, alone=4) == [(0, 3), (3, 7), (7, 9), (9, 18), (18, 19)]
    assert _query_blocks(spans, 10**6, alone=5) == [(0, 9), (9, 18), (18, 19)]
    assert _query_blocks(spans, 10**6, alone=100) == [(0, 19)]
    assert _query_blocks([(0, 8)], 10**6, alone=2) == [(0, 8)]
    # the padded chunks (fresh and short: attended as a padded batch) are in no block
    assert _query_blocks(spans, 10**6, skip=frozenset({0, 2})) == [(3, 7), (9, 19)]
    assert _query_blocks(spans, 10**6, alone=1, skip=frozenset({4})) == [(0, 3), (3, 7), (7, 9), (9, 18)]
