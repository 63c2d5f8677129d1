"""Each policy keeps what it claims, and the KV memory per sequence stays at the budget."""

from __future__ import annotations

import pytest
import torch

from adore import AdoreConfig, SamplingParams
from adore.engine import Engine
from adore.policies import make_policy

M = 24


def run_traced(model, tok, info, policy, prompt_len=10, steps=80):
    """Decode `steps` tokens of one sequence; yield (engine, released-before, trace entry) per step."""
    eng = Engine(model, tok, policy, info=info, max_batch=1, max_seq_len=prompt_len + steps + 2)
    eng.trace = []
    eng.add_request(list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=steps, ignore_eos=True))
    eng.step()  # prefill (+ first decode)
    while eng.has_work():
        released_before = set(eng.cache.released[0].nonzero()[:, 0].tolist())
        eng.step()
        if eng.has_work():
            yield eng, released_before, eng.trace[-1]


def kept(eng) -> set[int]:
    p = eng.cache.pos[0, : eng.cache.capacity]
    return set(p[p >= 0].tolist())


def candidates(tr) -> list[int]:
    p = tr["step_pos"][0]
    return p[p >= 0].tolist()


def test_window_keeps_last_m(tiny):
    for eng, _, tr in run_traced(*tiny, make_policy("window", AdoreConfig(cache_size=M))):
        cur = int(tr["cur_pos"][0])
        assert kept(eng) == set(range(max(0, cur - M + 1), cur + 1))


def test_sink_keeps_first_4_and_recent(tiny):
    for eng, _, tr in run_traced(*tiny, make_policy("sink", AdoreConfig(cache_size=M))):
        cur = int(tr["cur_pos"][0])
        if cur >= M:
            assert kept(eng) == set(range(4)) | set(range(cur - M + 5, cur + 1))


def test_strided_keeps_local_and_stride(tiny):
    cfg = AdoreConfig(cache_size=M, stride=4, recent_frac=0.5)
    for eng, _, tr in run_traced(*tiny, make_policy("strided", cfg)):
        cur = int(tr["cur_pos"][0])
        k = kept(eng)
        local = set(range(max(0, cur - M // 2 + 1), cur + 1))
        assert local <= k
        far = k - local
        if cur > M:  # the rest: the latest multiples of the stride, then (if room is left) recency
            strided = sorted((p for p in candidates(tr) if p % 4 == 0 and p not in local), reverse=True)
            take = strided[: M - len(local)]
            rest = sorted((p for p in candidates(tr) if p not in local and p not in take), reverse=True)
            assert far == set(take) | set(rest[: M - len(local) - len(take)])


def test_h2o_keeps_heavy_hitters_and_recent(tiny):
    model, tok, info = tiny
    heads, layers = model.config.num_attention_heads, model.config.num_hidden_layers
    assert heads and layers
    for eng, _, tr in run_traced(model, tok, info, make_policy("h2o", AdoreConfig(cache_size=M))):
        cur = int(tr["cur_pos"][0])
        pos, mass = tr["step_pos"][0], tr["mass"][0]
        valid = pos >= 0
        recent = valid & (pos > cur - M // 2)
        others = valid & ~recent
        heavy = mass.masked_fill(~others, -1).topk(M - int(recent.sum())).indices
        heavy = heavy[others[heavy]]
        expected = set(pos[recent].tolist()) | set(pos[heavy].tolist())
        assert kept(eng) == expected
    # attention mass of one step (before release) sums to heads x layers for a single query row
    eng = Engine(model, tok, make_policy("h2o", AdoreConfig(cache_size=1000)), max_batch=1, max_seq_len=64)
    eng.trace = []
    eng.add_request(list(range(3, 8)), SamplingParams(max_tokens=10, ignore_eos=True))
    eng.step()
    before = eng.cache.mass[0].sum().item()
    eng.step()
    assert abs(eng.cache.mass[0].sum().item() - before - heads * layers) < 1e-3


@pytest.mark.parametrize("mode", ["every", "promote"])
def test_adore_keeps_best_by_controller_and_rebuilds(tiny, mode):
    from adore.controller import Controller, ControllerConfig

    torch.manual_seed(1)
    ctrl = Controller(ControllerConfig(embed_dim=tiny[0].config.hidden_size))
    with torch.no_grad():  # a controller with strong query-dependent scores, so rebuilds happen
        for p in ctrl.parameters():
            p.normal_(0, 0.5)
    R = 4
    pol = make_policy("adore", AdoreConfig(cache_size=M, top_k=8, rebuild=R, rebuild_mode=mode, scorer="controller",
                                           rebuild_source="recompute"), ctrl)
    n_rebuilt = 0
    for eng, released_before, tr in run_traced(*tiny, pol):
        s = tr["pos_scores"][0]
        # rebuilt: the R best released tokens (promote: only those beating the weakest cached one)
        rel = sorted(released_before, key=lambda p: -s[p].item())
        if mode == "every":
            assert set(tr["rebuilt"][0]) == set(rel[:R])
        else:
            assert set(tr["rebuilt"][0]) <= set(rel[:R])
        n_rebuilt += len(tr["rebuilt"][0])
        # kept: the M best by controller score of everything in the cache during the step
        cands = candidates(tr)
        best = sorted(cands, key=lambda p: -s[p].item())[:M]
        assert kept(eng) == set(best)
        assert not (kept(eng) & set(eng.cache.released[0].nonzero()[:, 0].tolist()))
    assert n_rebuilt > 0


def test_adore_protect_recent_never_releases_the_last_n(tiny):
    from adore.controller import Controller, ControllerConfig

    torch.manual_seed(1)
    ctrl = Controller(ControllerConfig(embed_dim=tiny[0].config.hidden_size))
    with torch.no_grad():  # random strong scores: unprotected, the controller drops recent tokens too
        for p in ctrl.parameters():
            p.normal_(0, 0.5)
    N = 8
    pol = make_policy("adore", AdoreConfig(cache_size=M, top_k=None, rebuild=0, protect_recent=N,
                                                        scorer="controller"), ctrl)
    for eng, _, tr in run_traced(*tiny, pol):
        cur = int(tr["cur_pos"][0])
        assert set(range(cur - N + 1, cur + 1)) <= kept(eng)
        # the rest: the best of the unprotected candidates by controller score
        s = tr["pos_scores"][0]
        rest = sorted((p for p in candidates(tr) if p <= cur - N), key=lambda p: -s[p].item())[: M - N]
        assert kept(eng) - set(range(cur - N + 1, cur + 1)) == set(rest)
    with pytest.raises(ValueError, match="protect_recent"):
        AdoreConfig(cache_size=M, protect_recent=M)


@pytest.mark.parametrize("name,mode", [("h2o", "promote"), ("adore", "every"), ("adore", "promote")])
def test_kv_memory_stays_at_budget(tiny_gqa, name, mode):
    """2,000 generated tokens with m=64: the KV tensors never grow and never hold more than m."""
    model, tok, _ = tiny_gqa
    m, R = 64, 8
    eng = Engine(model, tok, make_policy(name, AdoreConfig(cache_size=m, top_k=32, rebuild=R,
                                                            rebuild_mode=mode)),
                 max_batch=2, max_seq_len=2100)
    shape, ptr = eng.cache.k.shape, eng.cache.k.data_ptr()
    expected_slots = m + (R if name == "adore" else 0) + 1 + 1  # + the step's rows + the trash slot
    assert shape[3] == expected_slots
    nbytes = eng.cache.kv_bytes_per_sequence()
    eng.add_request(list(range(3, 40)), SamplingParams(max_tokens=2000, ignore_eos=True))
    steps = 0
    while eng.has_work():
        eng.step()
        steps += 1
        if eng.n_active:
            assert int(eng.cache.valid(1).sum()) <= m
    assert steps >= 1999
    assert eng.cache.k.shape == shape and eng.cache.k.data_ptr() == ptr
    assert eng.cache.kv_bytes_per_sequence() == nbytes
    assert eng.stats["peak_cache_tokens"] == m
    assert eng.stats["decode_tokens"] >= 1999


def test_the_engine_only_calls_policy_hooks(tiny):
    """No policy class is named in the engine; a new scoring policy runs without an engine edit; building
    an engine leaves the global RNG as it was (the fresh controller is seeded in a forked RNG)."""
    import inspect
    from dataclasses import dataclass

    import adore.engine
    from adore.policies.base import Policy

    src = inspect.getsource(adore.engine)
    assert "AdorePolicy" not in src and "isinstance(pol" not in src

    @dataclass
    class EvenPositionsFirst(Policy):  # a policy with its own per-step scores, defined here only
        name = "even-first"

        def step_scores(self, cache, n, cur_tok, cur_pos):
            P = int(cur_pos.max()) + 1
            pos = torch.arange(P, device=cur_pos.device)
            return ((pos % 2 == 0).double() * 1e6 + pos)[None].expand(n, P)

        def keep_scores(self, view):
            return view.pos_scores.gather(1, view.pos.clamp(min=0))

    model, tok, _ = tiny
    torch.manual_seed(123)
    before = torch.get_rng_state()
    Engine(model, tok, make_policy("adore"), max_batch=1, max_seq_len=32)
    assert torch.equal(torch.get_rng_state(), before)

    pol = EvenPositionsFirst(AdoreConfig(cache_size=8, top_k=None))
    eng = Engine(model, tok, pol, max_batch=1, max_seq_len=64)
    eng.trace = []
    eng.generate([[5, 6, 7]], SamplingParams(max_tokens=20, ignore_eos=True))
    kept = sorted(int(p) for p in eng.trace[-1]["step_pos"][0] if p >= 0)
    last = int(eng.trace[-1]["cur_pos"][0])
    evens = [p for p in range(last) if p % 2 == 0]
    assert set(kept) >= set(evens[-7:])  # the even positions win the budget
