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


def test_the_scorer_reads_the_attention_the_labels_are_made_of(tiny_gqa):
    """With nothing released and no decay, a position's score after step t is query t's attention to
    it averaged over layers and heads: the function the controller's training labels are made of
    (adore.train.labels.averaged_attention_rows over a dense forward)."""
    from adore.train.labels import averaged_attention_rows, collect_qk

    model, tok, info = tiny_gqa
    ids = list(range(5, 45))
    eng = _engine(model, tok, info, cache_size=64, score_decay=0.0)
    eng.add_request(ids[:1], SamplingParams(forced_tokens=ids[1:]))
    got = {}
    while eng.has_work():
        eng.step()
        if eng.n_active:
            t = len(eng.requests[eng.rows[0]].out) - 1  # the position this step's token was at
            got[t] = eng.cache.feat_at[0, : t + 1, 0].clone()
    q, k, scale = collect_qk(model, torch.tensor(ids), list(range(model.config.num_hidden_layers)))
    want = averaged_attention_rows(q, k, scale, 0, len(ids))
    assert len(got) > 30
    for t, a in got.items():
        torch.testing.assert_close(a, want[t, : t + 1], atol=1e-5, rtol=1e-4)


def test_stored_tokens_come_back_with_the_kv_they_left_with(tiny_gqa, monkeypatch):
    from adore.cache import SlotCache

    model, tok, info = tiny_gqa
    left, back = {}, []
    real_stash, real_restore = SlotCache.stash, SlotCache.restore

    def stash(self, rows, slots, scores):
        for b, j in zip(rows.tolist(), slots.tolist()):
            left[(b, int(self.pos[b, j]))] = (self.k[:, b, :, j].clone(), self.v[:, b, :, j].clone())
        real_stash(self, rows, slots, scores)

    def restore(self, rows, positions, slots):
        real_restore(self, rows, positions, slots)
        for b, p, j in zip(rows.tolist(), positions.tolist(), slots.tolist()):
            k, v = left[(b, p)]
            assert torch.equal(self.k[:, b, :, j], k) and torch.equal(self.v[:, b, :, j], v)
            back.append(p)

    monkeypatch.setattr(SlotCache, "stash", stash)
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
