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
