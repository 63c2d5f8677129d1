"""The Serve builder contract without starting Ray: args parsing, deployment options, placement."""

from __future__ import annotations

import pytest
import torch
import yaml

pytest.importorskip("ray")

from adore.config import UserError  # noqa: E402
from adore.models import auto_dtype  # noqa: E402
from cluster.app import build_app, model_deployment_options  # noqa: E402
from cluster.config import ServeArgs  # noqa: E402


def k8s_args() -> dict:
    with open("k8s/base/rayservice.yaml") as f:
        rs = yaml.safe_load(f)
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    return app["args"]


def test_k8s_args_give_autoscaled_gpu_replicas_in_strict_pack_groups(monkeypatch):
    monkeypatch.setenv("ADORE_DEVICE", "cuda")
    args = k8s_args()
    cfg = ServeArgs.parse(args)
    assert cfg.policy_list == ["adore", "full"]
    assert cfg.model_id("adore") == "llama-2-7b:adore"
    opts = model_deployment_options(cfg, "adore")
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert opts["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 1}] * int(args["tp"])
    assert opts["autoscaling_config"]["min_replicas"] == args["min_replicas"]
    assert opts["autoscaling_config"]["max_replicas"] == args["max_replicas"]
    assert opts["max_ongoing_requests"] == args["max_ongoing_requests"]
    assert opts["ray_actor_options"] == {"num_cpus": 0}  # the replica rides in bundle 0 beside rank 0
    assert cfg.engine_spec("adore").dtype == "bfloat16"
    assert build_app(args) is not None


def test_cpu_defaults_and_fixed_replicas(monkeypatch):
    monkeypatch.delenv("ADORE_DEVICE", raising=False)
    cfg = ServeArgs.parse({"model": "random:tiny", "policies": "adore", "tp": "2", "num_replicas": "3",
                           "top_k": "none", "device": "cpu"})
    opts = model_deployment_options(cfg, "adore")
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert opts["placement_group_bundles"] == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert cfg.top_k is None and cfg.engine_spec("adore").dtype == auto_dtype("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert auto_dtype("cpu") == "float32" and auto_dtype("cuda") == "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert auto_dtype("cpu") == "bfloat16"


def test_method_knobs_reach_the_engine_config():
    cfg = ServeArgs.parse({"model": "random:tiny", "policies": "adore", "device": "cpu",
                           "promote_margin": "0.5", "protect_recent": "16", "rebuild": "4"})
    a = cfg.engine_spec("adore").adore_config()
    assert (a.promote_margin, a.protect_recent, a.rebuild) == (0.5, 16, 4)


def test_engine_settings_reach_the_engine_spec():
    cfg = ServeArgs.parse({"model": "random:tiny", "policies": "adore", "device": "cpu", "max_batch": "3",
                           "max_seq_len": "300", "max_prefill_tokens": "512", "cuda_graphs": "on"})
    spec = cfg.engine_spec("adore")
    assert (spec.max_batch, spec.max_seq_len, spec.max_prefill_tokens) == (3, 300, 512)
    assert spec.graphs is True and ServeArgs.parse({"device": "cpu"}).engine_spec("adore").graphs is None
    assert ServeArgs.parse(k8s_args()).max_prefill_tokens == k8s_args()["max_prefill_tokens"]


@pytest.mark.parametrize("args,msg", [
    ({"modle": "x"}, "unknown serve args"),
    ({"num_replicas": 1, "min_replicas": 1, "max_replicas": 2}, "not both"),
    ({"min_replicas": 1}, "go together"),
    ({"min_replicas": 3, "max_replicas": 2}, "replica bounds"),
    ({"policies": "adore,nope"}, "unknown policy"),
    ({"policies": " , "}, "at least one"),
    ({"tp": 0}, "tp must be"),
    ({"tp": "two"}, "bad serve arg"),
    ({"cache_size": 0}, "cache size"),
    ({"protect_recent": 192}, "protect_recent"),
    ({"max_prefill_tokens": 0}, "max_prefill_tokens"),
    ({"cuda_graphs": "yes"}, "cuda_graphs must be"),
])
def test_bad_args_fail_at_build_time(args, msg):
    with pytest.raises(UserError, match=msg):
        ServeArgs.parse(args)


def test_paced_stream_sends_first_and_last_at_once_and_groups_the_rest():
    import asyncio
    from types import SimpleNamespace

    from cluster.model_server import paced

    async def steps(n):  # one output per engine step, 10 ms apart
        for i in range(n):
            await asyncio.sleep(0.01)
            yield [SimpleNamespace(token_id=i, finished=i == n - 1)]

    async def collect(interval):
        return [[o.token_id for o in outs] async for outs in paced(steps(12), interval)]

    assert asyncio.run(collect(0.0)) == [[i] for i in range(12)]
    grouped = asyncio.run(collect(0.045))
    assert grouped[0] == [0] and grouped[-1][-1] == 11  # first at once, nothing lost, last flushed
    assert sum(grouped, []) == list(range(12)) and len(grouped) < 6
    assert ServeArgs.parse({"stream_interval_s": "0.25"}).stream_interval_s == 0.25
