"""Engine behaviour: continuous batching, sampling, stopping, aborts, input errors."""

from __future__ import annotations

import pytest

from adore import AdoreConfig, SamplingParams, UserError
from adore.engine import Engine
from adore.policies import make_policy

PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 40, 9, 25, 1)]


@pytest.mark.parametrize("name,mode", [("full", "promote"), ("window", "promote"), ("h2o", "promote"),
                                       ("strided", "promote"), ("adore", "every"), ("adore", "promote")])
def test_batch_with_joins_equals_alone(tiny_gqa, name, mode):
    """6 prompts of different lengths through 3 rows: sequences join as others finish (different
    max_tokens), and every one decodes exactly as it does alone."""
    model, tok, _ = tiny_gqa
    cfg = AdoreConfig(cache_size=16, top_k=8, rebuild=4, rebuild_mode=mode)
    lengths = [30, 12, 45, 20, 8, 33]
    alone = []
    for p, n in zip(PROMPTS, lengths):
        eng = Engine(model, tok, make_policy(name, cfg), max_batch=1, max_seq_len=128)
        alone.append(eng.generate([p], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids)
    eng = Engine(model, tok, make_policy(name, cfg), max_batch=3, max_seq_len=128)
    batch_sizes = []
    outs = eng.generate(PROMPTS, [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths],
                        progress=lambda _: batch_sizes.append(eng.n_active))
    assert [o.token_ids for o in outs] == alone
    assert max(batch_sizes) == 3  # they really shared steps


@pytest.mark.parametrize("name", ["full", "h2o", "adore"])
def test_warm_up_leaves_no_trace(tiny_gqa, name):
    """A warmed-up engine (what servers run at start) holds no request, counts nothing, and decodes
    exactly as a fresh one; its device-chosen prefill chunk is the CPU's."""
    model, tok, _ = tiny_gqa
    cfg = AdoreConfig(cache_size=16, rebuild=4)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (30, 12, 45)]
    want = [o.token_ids for o in Engine(model, tok, make_policy(name, cfg), max_batch=2,
                                        max_seq_len=128).generate(PROMPTS[:3], params)]
    eng = Engine(model, tok, make_policy(name, cfg), max_batch=2, max_seq_len=128)
    assert eng.max_prefill_tokens == 1024  # None: by device (adore.config.prefill_tokens_for)
    eng.warm_up()
    assert not eng.has_work() and not eng.requests and set(eng.stats.values()) == {0}
    assert [o.token_ids for o in eng.generate(PROMPTS[:3], params)] == want


def test_sampling_is_seeded_and_top_p_one_token_is_greedy(tiny):
    model, tok, _ = tiny
    eng = Engine(model, tok, make_policy("adore"), max_batch=4, max_seq_len=128)
    p = SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    a, b, c = eng.generate([PROMPTS[1]] * 3, [p, p, SamplingParams(max_tokens=20, temperature=1.0,
                                                                     seed=8, ignore_eos=True)])
    assert a.token_ids == b.token_ids != c.token_ids
    greedy = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    tiny_p = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=20, temperature=1.0, top_p=1e-6,
                                                       seed=1, ignore_eos=True))[0]
    assert tiny_p.token_ids == greedy.token_ids


def test_stop_strings_and_eos(smollm2):
    model, tok, info = smollm2
    eng = Engine(model, tok, make_policy("full"), info=info, max_batch=2, max_seq_len=256)
    prompt = "Mr. Woodhouse was fond of every body that he was used to, and"
    free = eng.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    text = free.text
    stop = text[12:16]
    assert stop.strip() and len(text) > 20
    out = eng.generate([prompt], SamplingParams(max_tokens=30, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    # a stop token id ends generation; the token is not shown as text
    eos = free.token_ids[5]
    out = eng.generate([prompt], SamplingParams(max_tokens=30, stop_token_ids=[eos]))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos
    assert len(out.token_ids) == free.token_ids.index(eos) + 1


def test_streamed_text_equals_final_text(smollm2):
    model, tok, info = smollm2
    eng = Engine(model, tok, make_policy("window", AdoreConfig(cache_size=32)), info=info, max_batch=1,
                 max_seq_len=256)
    rid = eng.add_request("Émile wrote: « naïve café » — 東京",
                          SamplingParams(max_tokens=40, ignore_eos=True))
    pieces = []
    while eng.has_work():
        pieces += [o.text for o in eng.step()]
    assert "".join(pieces) == eng.result(rid).text
    assert "\ufffd" not in "".join(pieces)


def test_abort_frees_the_row(tiny):
    model, tok, _ = tiny
    eng = Engine(model, tok, make_policy("adore"), max_batch=2, max_seq_len=128)
    a = eng.add_request(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
    b = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True))
    c = eng.add_request(PROMPTS[2], SamplingParams(max_tokens=5, ignore_eos=True))
    eng.step()
    assert eng.n_active == 2 and list(eng.waiting) == [c]
    assert eng.abort(a)
    assert eng.n_active == 1 and eng.rows == [b]
    eng.step()
    assert eng.n_active == 2  # c took the freed row
    assert not eng.abort("nope")


def test_bad_requests_are_user_errors(tiny):
    model, tok, _ = tiny
    eng = Engine(model, tok, make_policy("full"), max_batch=1, max_seq_len=64)
    for bad in ([], "", [10**6], [-1]):
        with pytest.raises(UserError):
            eng.add_request(bad, SamplingParams(max_tokens=4))
    with pytest.raises(UserError):
        eng.add_request(PROMPTS[0], SamplingParams(max_tokens=100))  # over max_seq_len
    for kw in ({"max_tokens": -1}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(UserError):
            SamplingParams(**kw)
    for kw in ({"cache_size": 0}, {"top_k": 0}, {"rebuild": -1}, {"rebuild_mode": "sometimes"}):
        with pytest.raises(UserError):
            AdoreConfig(**kw)
    with pytest.raises(UserError):
        make_policy("nope")
    assert not eng.has_work()


def test_max_tokens_zero_and_one(tiny):
    model, tok, _ = tiny
    eng = Engine(model, tok, make_policy("adore"), max_batch=2, max_seq_len=64)
    zero, one = eng.generate([PROMPTS[0], PROMPTS[0]], [SamplingParams(max_tokens=0),
                                                         SamplingParams(max_tokens=1, ignore_eos=True)])
    assert zero.token_ids == [] and zero.finish_reason == "length"
    assert len(one.token_ids) == 1 and one.finish_reason == "length"


@pytest.mark.parametrize("mode", ["every", "promote"])
def test_packed_rows_equal_padded_rows(tiny_gqa, mode):
    """Running the linears on live rows only (ragged rebuild counts) changes no token and no logit."""
    model, tok, _ = tiny_gqa
    cfg = AdoreConfig(cache_size=16, top_k=8, rebuild=4, rebuild_mode=mode)
    runs = []
    for pack in (False, True):
        eng = Engine(model, tok, make_policy("adore", cfg), max_batch=3, max_seq_len=128, pack_rows=pack)
        outs = eng.generate(PROMPTS[:3], SamplingParams(max_tokens=40, ignore_eos=True))
        runs.append((outs, eng.stats["rebuilt"]))
    (padded, rebuilt), (packed, rebuilt_packed) = runs
    assert rebuilt == rebuilt_packed and (rebuilt > 0 or mode == "promote")  # tiny promotes rarely
    for a, b in zip(padded, packed):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_top1_flags_forced_tokens_against_greedy(tiny):
    """Forcing the model's own greedy continuation agrees at every step; forcing another token at
    one step is flagged there (and only there), with that token's lower log-probability."""
    model, tok, _ = tiny
    eng = Engine(model, tok, make_policy("sink", AdoreConfig(cache_size=16)), max_batch=2, max_seq_len=64)
    greedy = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert greedy.top1 == [True] * 20
    forced = list(greedy.token_ids)
    forced[7] = (forced[7] + 1) % model.config.vocab_size
    same, other = eng.generate([PROMPTS[1]] * 2, [SamplingParams(forced_tokens=greedy.token_ids),
                                                  SamplingParams(forced_tokens=forced)])
    assert same.top1 == [True] * 20 and same.logprobs == pytest.approx(greedy.logprobs, abs=1e-5)
    assert other.top1[:7] == [True] * 7 and other.top1[7] is False
    assert other.logprobs[7] < greedy.logprobs[7]


def test_sampling_never_makes_nan():
    import torch

    from adore.sampling import sample_tokens

    for t in (1e-50, 5e-324):  # issue 16: once NaN probabilities and a dead engine loop
        assert SamplingParams(temperature=t).temperature == 0.0  # greedy below 1e-5

    def pick(logits, temperature, top_p, u=0.5):
        one = torch.tensor
        return int(sample_tokens(logits[None], one([temperature]), one([top_p]), one([u]))[0])

    logits = torch.tensor([1.0, 3.0, 2.0, -1e30])
    assert pick(logits, 1e-30, 1.0) == 1  # shifted before dividing: no inf - inf
    assert pick(torch.tensor([float("nan")] * 4), 0.7, 0.9) in range(4)
    assert pick(torch.tensor([0.0, float("inf"), 0.0]), 1.0, 1.0) == 1
    for u in (0.0, 0.999999):  # the ends of the inverse CDF stay inside the kept tokens
        assert pick(logits, 1.0, 0.5, u) == 1 and pick(logits, 1.0, 1.0, u) in (0, 1, 2)


def test_sampled_tokens_follow_temperature_and_top_p():
    """Batched sampling draws from softmax(logits / T) restricted to the top-p prefix."""
    import torch

    from adore.sampling import sample_tokens

    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    n = logits.shape[0]
    u = torch.rand(n, generator=g)
    for temp, top_p in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.8)):
        tok = sample_tokens(logits, torch.full((n,), temp), torch.full((n,), top_p), u)
        want = torch.softmax(logits[0] / temp, -1)
        sp, si = want.sort(descending=True)
        keep = (sp.cumsum(0) - sp) < top_p
        want = torch.zeros(4).index_put_((si[keep],), sp[keep])
        got = torch.bincount(tok, minlength=4).float() / n
        assert torch.allclose(got, want / want.sum(), atol=0.015), (temp, top_p, got, want)


def test_sampling_bounds_are_user_errors():
    for kw in ({"seed": 2**64}, {"seed": -(2**63) - 1}, {"temperature": float("nan")}, {"temperature": 2.5},
               {"top_p": float("nan")}):
        with pytest.raises(UserError):
            SamplingParams(**kw)
    SamplingParams(temperature=1.0, seed=-(2**63))
    SamplingParams(temperature=1.0, seed=2**63 - 1)


def test_a_failing_request_ends_alone_and_the_engine_goes_on(tiny):
    """A request whose host-side work fails ends with finish_reason "error"; the others in the same
    batch decode exactly as they would have, and the engine serves later requests."""
    model, tok, _ = tiny
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = Engine(model, tok, make_policy("adore"), max_batch=4, max_seq_len=128).generate(PROMPTS[:2], params)

    eng = Engine(model, tok, make_policy("adore"), max_batch=4, max_seq_len=128)
    good = eng.add_request(PROMPTS[0], params)
    bad = eng.add_request(PROMPTS[2], params)
    other = eng.add_request(PROMPTS[1], params)
    outs = eng.step()  # prefills
    calls = {"n": 0}

    def boom(tok_id):
        calls["n"] += 1
        raise RuntimeError("detokenizer exploded")

    eng.requests[bad].detok.add = boom
    errors = []
    while eng.has_work():
        outs = eng.step()
        errors += [o for o in outs if o.finish_reason == "error"]
    assert [o.request_id for o in errors] == [bad] and "detokenizer exploded" in errors[0].error
    assert eng.result(good).token_ids == alone[0].token_ids
    assert eng.result(other).token_ids == alone[1].token_ids
    assert eng.n_active == 0
    (again,) = eng.generate([PROMPTS[0]], params)
    assert again.token_ids == alone[0].token_ids


def test_the_engine_decides_by_the_model_info_from_load_model(tiny):
    """load_model returns a ModelInfo; the prefill's attention (top-K after a top-K adapter) and the
    shipped controller follow it, not attributes on the transformers model."""
    from dataclasses import replace

    from adore.assets import find_asset
    from adore.models import ModelInfo

    model, tok, info = tiny
    assert info == ModelInfo(name="random:tiny") and not hasattr(model, "adore_name")
    cfg = AdoreConfig(cache_size=16, top_k=4)
    plain = Engine(model, tok, make_policy("adore", cfg), info=info, max_batch=1, max_seq_len=32)
    tuned = Engine(model, tok, make_policy("adore", cfg), info=replace(info, tuned_top_k=8), max_batch=1,
                   max_seq_len=32)
    assert plain.prefill_top_k is None and tuned.prefill_top_k == 4  # the policy's K, as in decode
    assert find_asset(info) is None and find_asset(ModelInfo()) is None
    assert find_asset(ModelInfo(name="smollm2-135m")).name == "smollm2-135m.safetensors"


SYNC_METHODS = ("__int__", "__bool__", "__float__", "__index__", "item", "tolist", "nonzero", "cpu")


@pytest.mark.parametrize("policy,most", [("full", 2), ("sink", 3), ("h2o", 3), ("adore", 7)])
def test_a_decode_step_crosses_to_the_host_a_few_times_not_per_row(tiny, monkeypatch, policy, most):
    """Issue "Engine": token choice (greedy and sampled rows), stop checks and stats are batched; the
    step's figures cross with the tokens in one transfer. Counted here as the tensor-to-host calls a
    step makes (on a GPU each one waits for the device), with 4 rows, half of them sampled."""
    import torch

    from adore import AdoreConfig

    model, tok, info = tiny
    eng = Engine(model, tok, make_policy(policy, AdoreConfig(cache_size=16)), info=info, max_batch=4,
                 max_seq_len=256)
    for i in range(4):
        eng.add_request(list(range(3 + i, 40 + i)), SamplingParams(max_tokens=100, ignore_eos=True,
                                                                   temperature=0.7 * (i % 2), seed=i))
    for _ in range(30):  # past the budget: releases (and adore's second tier) every step
        eng.step()
    calls = []
    for name in SYNC_METHODS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for _ in range(10):
        eng.step()
    monkeypatch.undo()
    assert eng.n_active == 4
    assert len(calls) / 10 <= most, sorted(set(calls))
