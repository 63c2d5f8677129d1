"""The one-pass masked evaluation (adore/train/streameval.py) equals the engine's token-by-token stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adore.cli import perplexity
from adore.config import AdoreConfig
from adore.controller import Controller, ControllerConfig
from adore.engine import Engine
from adore.policies import make_policy
from adore.train.streameval import is_static, stream_ppl

EMMA = Path(__file__).resolve().parents[1] / "data" / "austen" / "emma.txt"


@pytest.mark.parametrize("policy,top_k", [("full", None), ("window", None), ("sink", None),
                                          ("strided", None), ("adore", 6), ("adore-nocontroller", None)])
def test_masked_stream_equals_engine(tiny_gqa, policy, top_k):
    model, tok, _ = tiny_gqa
    ids = tok.encode(EMMA.read_text()[:400])[:44]
    cfg = AdoreConfig(cache_size=12, top_k=top_k, rebuild=0 if policy == "adore" else 8, stride=4,
                      scorer="controller")
    assert is_static(policy, cfg)
    ctrl = None
    if policy == "adore":
        torch.manual_seed(3)
        ctrl = Controller(ControllerConfig(embed_dim=model.config.hidden_size))
        for p in ctrl.parameters():
            torch.nn.init.normal_(p, std=0.3)
    eng = Engine(model, tok, make_policy(policy, cfg, ctrl), max_batch=1, max_seq_len=len(ids) + 1)
    ref = perplexity(eng, ids, progress=False)
    fast = stream_ppl(model, ids, policy, cfg, ctrl)
    assert fast["tokens"] == ref["tokens"]
    assert abs(fast["ppl"] - ref["ppl"]) / ref["ppl"] < 1e-4, (fast["ppl"], ref["ppl"])


def test_rebuild_and_h2o_are_not_static():
    assert not is_static("adore", AdoreConfig(rebuild=8))
    assert not is_static("h2o", AdoreConfig())
    assert not is_static("adore-nocontroller", AdoreConfig(rebuild_mode="every"))
