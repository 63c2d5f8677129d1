"""ADORE v2: the attention scorer and the second tier (stored K/V brought back exactly)."""

from __future__ import annotations

import pytest
import torch

from adore import AdoreConfig, SamplingParams
from adore.config import UserError
from adore.engine import Engine
from adore.policies import make_policy


def _engine(model, tok, info, **knobs):
    cfg = AdoreConfig(**{"cache_size": 8, **knobs})
    return Engine(model, tok, make_policy("adore", cfg), info=info, max_batch=2, max_seq_len=96)


@pytest.mark.parametrize("score_layers", [None, 1])
def test_the_scorer_reads_the_attention_the_labels_are_made_of(tiny_gqa, score_layers):
    """With nothing released and no decay, a position's score after step t is query t's attention to
    it averaged over the scoring layers (all, or score_layers of them) and heads: the function the
    controller's training labels are made of (adore.train.labels.averaged_attention_rows)."""
    from adore.train.labels import averaged_attention_rows, collect_qk

    model, tok, info = tiny_gqa
    ids = list(range(5, 45))
    eng = _engine(model, tok, info, cache_size=64, score_decay=0.0, score_layers=score_layers)
    layers = eng.policy.scoring_layers
    assert len(layers) == (score_layers or model.config.num_hidden_layers)
    eng.add_request(ids[:1], SamplingParams(forced_tokens=ids[1:]))
    got = {}
    while eng.has_work():
        eng.step()
        if eng.n_active:
            t = len(eng.requests[eng.rows[0]].out) - 1  # the position this step's token was at
            got[t] = eng.cache.feat_at[0, : t + 1, 0].clone()
    q, k, scale = collect_qk(model, torch.tensor(ids), layers)
    want = averaged_attention_rows(q, k, scale, 0, len(ids))
    assert len(got) > 30
    for t, a in got.items():
        torch.testing.assert_close(a, want[t, : t + 1], atol=1e-5, rtol=1e-4)


def test_stored_tokens_come_back_with_the_kv_they_left_with(tiny_gqa, monkeypatch):
    from adore.cache import SlotCache

    model, tok, info = tiny_gqa
    left, back = {}, []
    real_release, real_restore = SlotCache.release, SlotCache.restore

    def release(self, drop, scores, most):
        for b, j in drop.nonzero().tolist():
            left[(b, int(self.pos[b, j]))] = (self.k[:, b, :, j].clone(), self.v[:, b, :, j].clone())
        return real_release(self, drop, scores, most)

    def restore(self, positions, ok):
        got = real_restore(self, positions, ok)
        for b, i in ok.nonzero().tolist():
            p = int(positions[b, i])
            j = int((self.pos[b, : self.capacity] == p).nonzero()[0, 0])  # the slot it came back to
            k, v = left[(b, p)]
            assert torch.equal(self.k[:, b, :, j], k) and torch.equal(self.v[:, b, :, j], v)
            back.append(p)
        assert int(got) == int(ok.sum())
        return got

    monkeypatch.setattr(SlotCache, "release", release)
    monkeypatch.setattr(SlotCache, "restore", restore)
    eng = _engine(model, tok, info, rebuild=4)
    eng.add_request(list(range(3, 9)), SamplingParams(max_tokens=60, ignore_eos=True))
    eng.add_request(list(range(20, 24)), SamplingParams(max_tokens=60, ignore_eos=True))
    while eng.has_work():
        eng.step()
        if eng.n_active:
            assert int(eng.cache.valid(eng.n_active).sum(1).max()) <= 8  # m between steps
    assert back and eng.stats["rebuilt"] == len(back)


def test_the_store_holds_at_most_store_size(tiny_gqa):
    model, tok, info = tiny_gqa
    eng = _engine(model, tok, info, store_size=5)
    assert eng.cache.store_k.shape[3] == 5 + 1  # + its trash slot
    eng.add_request(list(range(3, 40)), SamplingParams(max_tokens=40, ignore_eos=True))  # cut at prefill
    while eng.has_work():
        eng.step()
        if eng.n_active:
            stored = eng.cache.store_pos[0, :5]
            assert int((stored >= 0).sum()) == eng.stats["stored_tokens"] == 5
            assert not set(stored.tolist()) & set(eng.cache.pos[0, : eng.cache.capacity].tolist())


@pytest.mark.parametrize("knobs", [{}, {"rebuild": 0}, {"rebuild_source": "recompute"},
                                   {"scorer": "controller"}, {"scorer": "controller", "rebuild_source": "recompute"}])
def test_every_scorer_and_source_equals_full_attention_within_budget(tiny_gqa, knobs):
    model, tok, info = tiny_gqa
    prompts = [list(range(3, 12)), list(range(30, 35))]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    full = Engine(model, tok, make_policy("full"), info=info, max_batch=2, max_seq_len=64).generate(prompts, params)
    ours = _engine(model, tok, info, cache_size=40, **knobs).generate(prompts, params)
    assert [r.token_ids for r in ours] == [r.token_ids for r in full]


def test_a_controller_needs_the_controller_scorer(tiny):
    from adore.controller import Controller, ControllerConfig

    ctrl = Controller(ControllerConfig(embed_dim=tiny[0].config.hidden_size))
    with pytest.raises(UserError, match="scorer"):
        make_policy("adore", AdoreConfig(cache_size=8), ctrl)
    assert make_policy("adore", AdoreConfig(cache_size=8, scorer="controller"), ctrl).controller is ctrl


def _learned_policy(**knobs):
    from adore.scorer import LearnedScorer, ScorerConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        scorer = LearnedScorer(ScorerConfig(decays=(0.0, 0.5)))
    pol = make_policy("adore", AdoreConfig(**{"cache_size": 8, "scorer": "learned", **knobs}))
    pol.learned = scorer
    return pol


def test_the_learned_scorer_reads_decayed_attention_and_ranks_by_its_scores(tiny_gqa):
    """scorer 'learned': each position keeps one decayed average of the attention it received per
    decay (decay 0: the last step's, as the labels), and the step's scores are the scorer's of them."""
    from adore.train.labels import averaged_attention_rows, collect_qk

    model, tok, info = tiny_gqa
    ids = list(range(5, 45))
    eng = Engine(model, tok, _learned_policy(cache_size=64), info=info, max_batch=1, max_seq_len=96)
    eng.trace = []
    eng.add_request(ids[:1], SamplingParams(forced_tokens=ids[1:]))
    q, k, scale = collect_qk(model, torch.tensor(ids), list(range(model.config.num_hidden_layers)))
    want = averaged_attention_rows(q, k, scale, 0, len(ids))
    ema = want[0].clone()  # the one-token prompt's attention starts every average
    while eng.has_work():
        eng.step()
        if not eng.n_active:
            break
        t = len(eng.requests[eng.rows[0]].out) - 1
        ema = 0.5 * ema + 0.5 * want[t]
        feats = eng.cache.feat_at[0, : t + 1]
        torch.testing.assert_close(feats[:, 0], want[t, : t + 1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(feats[:, 1], ema[: t + 1], atol=1e-5, rtol=1e-4)
        dist = t - torch.arange(t + 1)
        torch.testing.assert_close(eng.trace[-1]["pos_scores"][0, : t + 1].float(),
                                   eng.policy.learned(feats[None], dist[None])[0], atol=1e-5, rtol=1e-5)


def test_the_learned_scorer_keeps_the_budget_and_equals_full_attention_within_it(tiny_gqa):
    model, tok, info = tiny_gqa
    prompts = [list(range(3, 12)), list(range(30, 35))]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    full = Engine(model, tok, make_policy("full"), info=info, max_batch=2, max_seq_len=64).generate(prompts, params)
    ours = Engine(model, tok, _learned_policy(cache_size=40), info=info, max_batch=2, max_seq_len=64)
    assert [r.token_ids for r in ours.generate(prompts, params)] == [r.token_ids for r in full]
    eng = Engine(model, tok, _learned_policy(rebuild=4), info=info, max_batch=2, max_seq_len=96)
    eng.add_request(prompts[0], SamplingParams(max_tokens=60, ignore_eos=True))
    while eng.has_work():
        eng.step()
        if eng.n_active:
            assert int(eng.cache.valid(eng.n_active).sum(1).max()) <= 8
    assert eng.stats["released"] > 0


def test_the_learned_scorer_needs_a_trained_one(tiny_gqa):
    model, tok, info = tiny_gqa
    with pytest.raises(UserError, match="no trained scorer"):
        Engine(model, tok, make_policy("adore", AdoreConfig(cache_size=8, scorer="learned")), info=info)


def test_scorer_path_loads_a_trained_scorer_for_a_model_that_ships_none(tiny_gqa, tmp_path):
    """scorer_path: a scorer file from the trainer serves a model with none shipped; a missing file, a
    file that is not a scorer, or scorer_path without scorer 'learned' is a clear UserError."""
    model, tok, info = tiny_gqa
    trained = _learned_policy().learned
    trained.save(str(tmp_path / "s.safetensors"))
    pol = make_policy("adore", AdoreConfig(cache_size=8, scorer="learned", scorer_path=str(tmp_path / "s.safetensors")))
    eng = Engine(model, tok, pol, info=info, max_batch=1, max_seq_len=64)
    for a, b in zip(eng.policy.learned.parameters(), trained.parameters()):
        assert torch.equal(a, b)
    eng.generate([list(range(3, 20))], SamplingParams(max_tokens=4, ignore_eos=True))
    (tmp_path / "junk.safetensors").write_text("not a scorer")
    for path, match in [(tmp_path / "missing.safetensors", "no such file"), (tmp_path / "junk.safetensors",
                                                                             "not a trained scorer")]:
        pol = make_policy("adore", AdoreConfig(cache_size=8, scorer="learned", scorer_path=str(path)))
        with pytest.raises(UserError, match=match):
            Engine(model, tok, pol, info=info)
    with pytest.raises(UserError, match="scorer_path"):
        AdoreConfig(scorer_path=str(tmp_path / "s.safetensors"))
