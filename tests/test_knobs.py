"""One config: every AdoreConfig knob reaches the engine's policy from the CLI, Serve args and a job
grid; the training metrics' simulation makes the engine's decisions (issue 17, parts 2 and 3)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch

from adore.config import AdoreConfig, SamplingParams
from adore.controller import Controller, ControllerConfig
from adore.engine import Engine
from adore.policies import make_policy

EMMA = Path(__file__).resolve().parents[1] / "data" / "austen" / "emma.txt"


def test_protect_sinks_reaches_the_policy_from_adore_cli_args():
    from adore.cli import load_parts, make_parser

    args = make_parser().parse_args(["generate", "--model", "random:tiny", "--prompt", "hi",
                                     "--cache-size", "16", "--protect-sinks", "4", "--top-k", "none"])
    _, _, _, pol = load_parts(args)
    assert (pol.cfg.protect_sinks, pol.cfg.cache_size, pol.top_k) == (4, 16, None)


def test_protect_sinks_reaches_the_policy_from_serve_args():
    pytest.importorskip("ray")
    from cluster.config import ServeArgs

    args = ServeArgs.parse({"model": "random:tiny", "policies": "adore", "device": "cpu", "protect_sinks": "4"})
    pol = args.engine_spec("adore").make_policy()
    assert pol.cfg.protect_sinks == 4 and type(pol.cfg) is AdoreConfig


def test_protect_sinks_reaches_the_policy_from_a_job_grid():
    from jobs.grid import expand, validate
    from jobs.runner import CellRunner

    cfg = validate({"models": ["random:tiny"], "policies": ["adore", "sink"], "cache_sizes": [16],
                    "policy_options": {"protect_sinks": 4}, "tasks": ["ppl"]})
    cells = {c["policy"]: c for c in expand(cfg)}
    assert cells["adore"]["policy_options"] == {"protect_sinks": 4}
    assert cells["sink"]["policy_options"] == {"sink_tokens": 4}  # only the options a policy reads
    runner = CellRunner({}, device="cpu")
    assert runner.policy(cells["adore"]).cfg.protect_sinks == 4


def test_every_knob_is_a_flag_a_serve_arg_and_an_engine_spec_field():
    pytest.importorskip("ray")
    from adore.cli import make_parser
    from cluster.config import ServeArgs
    from workers.spec import EngineSpec

    names = [f.name for f in fields(AdoreConfig)]
    ns = make_parser().parse_args(["ppl", "--text-file", "x"])
    assert all(getattr(ns, n) == getattr(AdoreConfig(), n) for n in names)
    for cls in (ServeArgs, EngineSpec):
        assert {f.name: f.default for f in fields(cls) if f.name in names} == \
               {f.name: f.default for f in fields(AdoreConfig)}
    assert ServeArgs.parse({"top_k": "none", "recent_frac": "0.25"}).engine_spec("h2o").make_policy().cfg \
        == AdoreConfig(top_k=None, recent_frac=0.25)


def _controller(dim: int) -> Controller:
    torch.manual_seed(1)
    ctrl = Controller(ControllerConfig(embed_dim=dim))
    with torch.no_grad():  # strong query-dependent scores, so promotions happen
        for p in ctrl.parameters():
            p.normal_(0, 0.5)
    return ctrl


def test_adore_protect_sinks_never_releases_the_first_n(tiny):
    model, tok, _ = tiny
    pol = make_policy("adore", AdoreConfig(cache_size=12, top_k=None, rebuild=2, protect_sinks=3,
                                        scorer="controller", rebuild_source="recompute"),
                      _controller(model.config.hidden_size))
    eng = Engine(model, tok, pol, max_batch=1, max_seq_len=64)
    eng.trace = []
    eng.generate([list(range(3, 13))], SamplingParams(max_tokens=40, ignore_eos=True))
    for tr in eng.trace:
        assert {0, 1, 2} <= set(tr["step_pos"][0].tolist())
    assert eng.stats["released"] > 0


@pytest.mark.parametrize("mode", ["promote", "every"])
def test_simulation_makes_the_engines_decisions(tiny, mode):
    """metrics.simulate over the engine's own controller scores holds, at every step, the set of
    tokens the engine's cache holds (promote_margin included: the simulation once ignored it)."""
    from adore.train.metrics import simulate

    model, tok, _ = tiny
    T = 48
    pol = make_policy("adore", AdoreConfig(cache_size=8, top_k=None, rebuild=3, rebuild_mode=mode,
                                        scorer="controller", rebuild_source="recompute"),
                      _controller(model.config.hidden_size))
    eng = Engine(model, tok, pol, max_batch=1, max_seq_len=T + 1)
    eng.trace = []
    ids = list(range(3, 3 + T))
    eng.add_request(ids[:1], SamplingParams(forced_tokens=ids[1:]))
    while eng.has_work():
        eng.step()
    raw = torch.full((T, T), float("-inf"))
    raw[0, 0] = 0.0
    held = {0: {0}}
    for tr in eng.trace:
        t = int(tr["cur_pos"][0])
        raw[t, : t + 1] = tr["pos_scores"][0, : t + 1]
        p = tr["step_pos"][0]
        held[t] = set(p[p >= 0].tolist())
    member = simulate(pol, T, scores=raw)
    assert eng.stats["rebuilt"] > 0
    for t, want in held.items():
        assert set(member[t].nonzero()[:, 0].tolist()) == want, t


def test_masked_stream_models_the_protected_positions(tiny_gqa):
    from adore.cli import perplexity
    from adore.train.streameval import is_static, stream_ppl

    model, tok, _ = tiny_gqa
    ids = tok.encode(EMMA.read_text()[:400])[:44]
    cfg = AdoreConfig(cache_size=12, top_k=6, rebuild=0, protect_sinks=2, protect_recent=3, scorer="controller")
    assert is_static("adore", cfg)
    ctrl = _controller(model.config.hidden_size)
    eng = Engine(model, tok, make_policy("adore", cfg, ctrl), max_batch=1, max_seq_len=len(ids) + 1)
    ref = perplexity(eng, ids, progress=False)
    fast = stream_ppl(model, ids, "adore", cfg, ctrl)
    assert abs(fast["ppl"] - ref["ppl"]) / ref["ppl"] < 1e-4, (fast["ppl"], ref["ppl"])


def test_policy_from_spec_refuses_an_adapter_for_random_weights():
    from adore.config import UserError
    from adore.policies import policy_from_spec

    pol = policy_from_spec("adore:store_size=128:score_layers=4", adapters=False)
    assert (pol.name, pol.cfg.store_size, pol.cfg.score_layers) == ("adore", 128, 4)
    with pytest.raises(UserError, match="adapter"):
        policy_from_spec("adore:adapter=/some/dir", adapters=False)
