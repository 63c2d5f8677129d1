"""The controller runs from any checkpoint, a fresh one included, and round-trips through safetensors."""

from __future__ import annotations

import pytest
import torch

from adore.controller import Controller, ControllerConfig


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    ctrl = Controller(ControllerConfig(embed_dim=64))
    for p in ctrl.parameters():
        torch.nn.init.normal_(p, std=0.3)
    path = tmp_path / "c.safetensors"
    ctrl.save(str(path), extra={"trained_on": "test"})
    back = Controller.load(str(path))
    emb, pos = torch.randn(12, 64), torch.arange(12)
    h1, h2 = ctrl.run(emb, pos), back.run(emb, pos)
    assert torch.equal(h1, h2)
    f = ctrl.token_features(h1)[None]
    q = ctrl.query_features(h1[-1:])
    d = torch.arange(11, -1, -1)[None]
    assert torch.equal(ctrl.score(q, f, d), back.score(q, f, d))


def test_step_matches_run():
    ctrl = Controller(ControllerConfig(embed_dim=32))
    emb, pos = torch.randn(7, 32), torch.arange(7)
    seq = ctrl.run(emb, pos)
    h = ctrl.init_state(1, "cpu")
    for t in range(7):
        h = ctrl.step(emb[t : t + 1], pos[t : t + 1], h)
    assert torch.allclose(h, seq[-1:], atol=1e-6)


def test_fresh_controller_prefers_recent_tokens():
    ctrl = Controller(ControllerConfig(embed_dim=32))
    h = ctrl.run(torch.randn(50, 32), torch.arange(50))
    s = ctrl.score(ctrl.query_features(h[-1:]), ctrl.token_features(h)[None], torch.arange(49, -1, -1)[None])
    assert s[0, -1] > s[0, -10] > s[0, 0]


def test_rejects_other_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not an ADORE controller"):
        Controller.load(str(tmp_path / "x.safetensors"))


def test_training_and_serving_scores_are_one_function(monkeypatch):
    """Training (`Controller.pair_scores`, over whole sequences) and serving (the ADORE policy's
    per-step `position_scores`, one query per sequence) both call `Controller.score`, and give the
    same numbers for the same token states: row t of the training matrix is the decode step at t."""
    from adore.config import AdoreConfig
    from adore.policies import make_policy

    torch.manual_seed(0)
    ctrl = Controller(ControllerConfig(embed_dim=32))
    for p in ctrl.parameters():  # away from the prior, so that the query term matters
        torch.nn.init.normal_(p, std=0.3)
    B, T = 2, 40
    h = ctrl.run_batch(torch.randn(B, T, 32), torch.arange(T)[None].expand(B, T))
    pol = make_policy("adore", AdoreConfig(cache_size=16, scorer="controller"), ctrl)

    calls = []
    real = Controller.score
    monkeypatch.setattr(Controller, "score", lambda self, *a: calls.append(a[0].dim()) or real(self, *a))
    rows = torch.tensor([0, 5, 17, T - 1])
    train = ctrl.pair_scores(h, rows)  # [B, R, T]
    assert calls == [3]  # one call, with [B, R, S] query rows
    feats, q = ctrl.token_features(h), ctrl.query_features(h[:, rows])  # the engine's feat_at, queries
    for j, t in enumerate(rows.tolist()):
        serve = pol.position_scores(feats[:, : t + 1], torch.full((B,), t), q[:, j])
        # float32 matmuls of other shapes ([B, 1, t+1] here, [B, R, T] in training) may sum in
        # another order: equal up to the last bits, not bit for bit
        torch.testing.assert_close(serve, train[:, j, : t + 1], rtol=1e-6, atol=1e-5)
        assert torch.isinf(train[:, j, t + 1 :]).all()  # the future is masked in training
    assert calls == [3] + [2] * len(rows)  # and serving went through the same function, one row a call
