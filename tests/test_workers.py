"""Shard groups on a private Ray instance: tp=2 over gloo (DeepSpeed AutoTP) decodes exactly like tp=1
and like the engine alone; the async driver streams, aborts and bounds its queue; shutdown leaves no
actor, placement group or process group behind."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from contextlib import aclosing

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from adore import SamplingParams  # noqa: E402
from adore.engine import Engine  # noqa: E402
from adore.models import load_model  # noqa: E402
from workers import AsyncDriver, EngineSpec, Overloaded, ShardGroup  # noqa: E402
from workers.group import RanksDiverged  # noqa: E402
from workers.rank import StepResult  # noqa: E402

pytestmark = pytest.mark.ray

SPEC = EngineSpec(model="random:tiny-gqa", policy="adore", cache_size=12, top_k=6, rebuild=2,
                  rebuild_mode="every", max_batch=4, max_seq_len=128, threads=1)
PROMPTS = ["The quick brown fox", "jumps over the lazy dog, again and again", "hi"]
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def ray_instance():
    tmp = tempfile.mkdtemp(prefix="arw", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(num_cpus=4, _temp_dir=tmp, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def engine_alone(spec: EngineSpec, params: list[SamplingParams]) -> list[list[int]]:
    model, tok, info = load_model(spec.model, seed=spec.seed)
    eng = Engine(model, tok, spec.make_policy(), info=info, max_batch=spec.max_batch,
                 max_seq_len=spec.max_seq_len)
    return [r.token_ids for r in eng.generate([tok.encode(p) for p in PROMPTS], params)]


def group_run(group: ShardGroup, params: list[SamplingParams]) -> list[list[int]]:
    tok = group.tokenizer()
    cmds = [("add", f"q{i}", tok.encode(p), sp) for i, (p, sp) in enumerate(zip(PROMPTS, params))]
    toks: dict[str, list[int]] = {}
    res = group.step_sync(cmds)
    while True:
        for o in res.outputs:
            toks.setdefault(o.request_id, []).append(o.token_id)
        if not (res.n_active or res.n_waiting):
            break
        res = group.step_sync([])
    return [toks[f"q{i}"] for i in range(len(PROMPTS))]


def test_tp2_matches_tp1_and_engine_alone(ray_instance):
    params = [GREEDY, GREEDY, SAMPLED]  # a seeded sampled request: every rank must draw the same tokens
    want = engine_alone(SPEC, params)
    got = {}
    for tp in (1, 2):
        group = ShardGroup(SPEC, tp=tp)
        try:
            heads = {i["kv_heads_local"] for i in group.info}
            assert heads == {2 // tp}, group.info  # AutoTP really split the KV heads
            got[tp] = group_run(group, params)
            stats = group.step_sync([]).stats
            assert stats["released"] > 0  # the bounded cache was exercised
        finally:
            actors, pg = list(group.actors), group.pg
            group.shutdown()
        # clean shutdown: no actor and no placement group left
        for a in actors:
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(a.__ray_ready__.remote(), timeout=30)
        assert ray.util.placement_group_table(pg)["state"] == "REMOVED"
    assert got[1] == want
    assert got[2] == want


def test_driver_streams_aborts_and_bounds_its_queue(ray_instance):
    # long requests must outlast the test's sleeps on a fast machine (100 tokens of the tiny model
    # took under 0.3 s on one): 4,000 tokens, aborted long before they end
    spec = SPEC.replace(policy="full", max_batch=2, max_seq_len=4096)
    group = ShardGroup(spec, tp=1)
    tok = group.tokenizer()

    async def main():
        drv = AsyncDriver(group, max_queue=1)
        long = SamplingParams(max_tokens=4000, ignore_eos=True)
        a = drv.submit(tok.encode("first"), long)
        b = drv.submit(tok.encode("second"), long)
        c = drv.submit(tok.encode("third"), long)  # waits for a row
        with pytest.raises(Overloaded) as exc:
            drv.submit(tok.encode("fourth"), long)
        assert exc.value.retry_after_s >= 1
        got_a = []
        async with aclosing(drv.stream(a)) as stream:  # read a few tokens, then walk away
            async for outs in stream:
                got_a += outs
                if len(got_a) >= 3:
                    break
        assert a not in drv._queues
        await asyncio.sleep(0.3)
        assert (drv.n_active, drv.n_waiting) == (2, 0)  # a's row went to the waiting request at once
        assert drv.live == 2
        drv.abort(b)
        drv.abort(c)
        await asyncio.sleep(0.3)
        assert (drv.n_active, drv.live) == (0, 0)
        steps = drv.stats["steps"]
        await asyncio.sleep(0.3)
        assert drv.stats["steps"] == steps  # idle: the loop sleeps
        e = drv.submit(tok.encode("fifth"), SamplingParams(max_tokens=5, ignore_eos=True))
        n = 0
        async for outs in drv.stream(e):
            n += sum(o.token_id is not None for o in outs)
        assert n == 5
        # sampled requests without a seed still get one seed shared by every rank
        d = drv.submit(tok.encode("x"), SamplingParams(max_tokens=3, temperature=1.0))
        async for _ in drv.stream(d):
            pass
        await drv.close()

    try:
        asyncio.run(main())
    finally:
        group.shutdown()


def test_diverged_ranks_fail_loudly():
    class Out:
        def __init__(self, tok):
            self.request_id, self.token_id, self.finished = "r", tok, False

    g = ShardGroup.__new__(ShardGroup)
    ok = g._check([StepResult([Out(5)]), StepResult([Out(5)])])
    assert ok.outputs[0].token_id == 5
    with pytest.raises(RanksDiverged):
        g._check([StepResult([Out(5)]), StepResult([Out(6)])])
