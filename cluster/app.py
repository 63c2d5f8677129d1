"""The Serve application builder: `cluster.app:build_app` (serve run / serve deploy / KubeRay).

    serve run cluster.app:build_app model=random:tiny policies=adore,full
    serve deploy cluster/serve_config.yaml

One model deployment per policy ("model-<policy>"), each replica holding one shard group of `tp` rank
actors in its own STRICT_PACK placement group (bundle i: rank i; one GPU each on GPU clusters, CPU
bundles otherwise), behind one FastAPI ingress that routes by model id. Serve balances each
deployment's replicas; autoscaling targets `max_batch` ongoing requests per replica.
"""

from __future__ import annotations

import logging

import ray
from ray import serve

from workers.group import bundles

from .config import ServeArgs
from .ingress import Ingress
from .model_server import ModelServer

HEALTH_CHECK_PERIOD_S = 2.0
log = logging.getLogger("ray.serve")


def model_deployment_options(cfg: ServeArgs, policy: str) -> dict:
    spec = cfg.engine_spec(policy)
    opts = {
        "name": f"model-{policy}",
        "max_ongoing_requests": cfg.max_ongoing_requests,
        # Serve's router queue (per caller) also counts a burst of requests still being assigned, so
        # it gets room for a full round of replicas' ongoing requests; the replica's own bound
        # (max_queue waiting requests) is the precise one.
        "max_queued_requests": cfg.max_queue + cfg.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": 0},
        "placement_group_bundles": bundles(cfg.tp, cfg.cpus_per_rank or 1.0, spec.uses_gpu),
        "placement_group_strategy": "STRICT_PACK",
        # A dead rank fails the replica's next check (ModelServer.check_health): checked often, so
        # that Serve replaces it within seconds; the check itself answers in at most ~10 s.
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 20,
    }
    if cfg.min_replicas is not None:
        opts["autoscaling_config"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                      "target_ongoing_requests": cfg.max_batch}
    else:
        opts["num_replicas"] = cfg.replica_bounds[0]
    return opts


def build_app(args: dict) -> serve.Application:
    """args: see cluster/config.py (model, policies, tp, num_replicas | min/max_replicas, ...)."""
    cfg = ServeArgs.parse(args)
    cfg.device = cfg.resolved_device()  # decided once, here, for every replica
    if ray.is_initialized():  # defaults that fit this cluster (`adore serve` checked strictly already)
        res = ray.cluster_resources()
        for problem in cfg.fit_to_cluster(res.get("CPU", 0.0), res.get("GPU", 0.0), strict=False):
            log.warning("adore: %s (replicas that do not fit wait for the cluster to grow)", problem)
    plain = cfg.to_dict()
    model = serve.deployment(ModelServer)
    models = {cfg.model_id(p): model.options(**model_deployment_options(cfg, p)).bind(plain, p)
              for p in cfg.policy_list}
    return Ingress.options(name="ingress", num_replicas=cfg.ingress_replicas,
                           ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000,
                           ).bind(models, plain)
