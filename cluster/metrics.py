"""Prometheus metrics of the HTTP API, served at the ingress's `/metrics` (prometheus_client text).

    adore_requests_total{model,endpoint,status}     finished HTTP requests by status code
    adore_prompt_tokens_total{model}                 prompt tokens admitted
    adore_generation_tokens_total{model}             tokens generated
    adore_generation_tokens_per_second{model}        over the last 10 s
    adore_time_to_first_token_seconds{model}         histogram, request arrival -> first token
    adore_request_duration_seconds{model}            histogram, arrival -> last token
    adore_running_sequences{model}                   sequences decoding (sum over replicas)
    adore_waiting_sequences{model}                   requests waiting: for a free engine row, or in Serve's
                                                     router for a replica (the latter also alone below)
    adore_router_queued_requests{model}              requests this ingress sent that no replica took yet
    adore_tokens_released_total{model}               tokens released from the bounded caches
    adore_tokens_rebuilt_total{model}                released tokens rebuilt into the caches
    adore_stored_tokens{model}                       released tokens whose K/V the second tiers hold now
    adore_engine_steps_total{model}, adore_engine_decode_tokens_total{model}, adore_batch_size_peak{model}

Replica-side numbers come from the snapshots replicas attach to their stream chunks (at most one a
second per replica, and at each request's end) and from a `stats` call at scrape time. A replica's
numbers are dropped as soon as its actor is gone or it reports itself failed (`forget_dead`), else
after STALE_S without news; each replica also exports its own gauges through Ray's metrics agent
(`ray_adore_replica_*` on the metrics export port), the cluster-wide source a Prometheus scrapes.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENCY_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STALE_S = 60.0  # forget a replica's snapshot after this long without news (a dead one: see forget_dead)
DEFAULT_RESTART_S = 12.0  # a replacement replica's start before any replica has reported its own


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("adore_requests", "Finished HTTP requests", ["model", "endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("adore_prompt_tokens", "Prompt tokens admitted", ["model"], registry=r)
        self.gen_tokens = Counter("adore_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.tps = Gauge("adore_generation_tokens_per_second", "Generated tokens/s over the last 10 s",
                         ["model"], registry=r)
        self.ttft = Histogram("adore_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.duration = Histogram("adore_request_duration_seconds", "Request duration", ["model"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        g = lambda name, doc: Gauge(name, doc, ["model"], registry=r)
        self.replica_gauges = {
            "running": g("adore_running_sequences", "Sequences decoding"),
            "waiting": g("adore_waiting_sequences", "Requests waiting for a free engine row"),
            "released": g("adore_tokens_released_total", "Tokens released from the bounded KV caches"),
            "rebuilt": g("adore_tokens_rebuilt_total", "Released tokens rebuilt into the caches"),
            "stored_tokens": g("adore_stored_tokens", "Released tokens whose K/V the second tiers hold now"),
            "steps": g("adore_engine_steps_total", "Engine decode steps"),
            "decode_tokens": g("adore_engine_decode_tokens_total", "Sequence-steps decoded"),
            "peak_running": g("adore_batch_size_peak", "Largest decode batch seen (per replica, max)"),
        }
        self.router_queued = g("adore_router_queued_requests", "Requests sent that no replica took yet")
        self.unassigned: dict[str, int] = {}  # model -> requests awaiting their replica's first event
        self._recent: dict[str, deque] = {}
        self._replicas: dict[str, dict[str, dict]] = {}  # model -> replica -> latest snapshot

    def tokens(self, model: str, n: int) -> None:
        if n:
            self.gen_tokens.labels(model).inc(n)
            self._recent.setdefault(model, deque()).append((time.monotonic(), n))

    def n_replicas(self, model: str) -> int:
        return len(self._replicas.get(model, ()))

    def restart_s(self, model: str) -> float:
        """The longest restart estimate its replicas reported: what a replacement makes callers wait."""
        known = [s["restart_s"] for s in self._replicas.get(model, {}).values() if s.get("restart_s")]
        return max(known, default=DEFAULT_RESTART_S)

    def forget_dead(self, alive) -> None:
        """Drop the snapshots of replicas that failed or whose actor is gone (`alive(actor_name)`)."""
        for reps in self._replicas.values():
            for rep, snap in list(reps.items()):
                if not snap.get("healthy", True) or (snap.get("actor") and not alive(snap["actor"])):
                    del reps[rep]

    def replica_snapshot(self, snap: dict | None) -> None:
        if snap and "model" in snap:
            reps = self._replicas.setdefault(snap["model"], {})
            old = reps.get(snap.get("replica", "?"))
            if old is None or old.get("time", 0) <= snap.get("time", 0):  # keep the newest
                reps[snap.get("replica", "?")] = snap

    def render(self) -> bytes:
        now = time.monotonic()
        for model, dq in self._recent.items():
            while dq and dq[0][0] < now - 10:
                dq.popleft()
            self.tps.labels(model).set(sum(n for _, n in dq) / 10.0)
        wall = time.time()
        for model, reps in self._replicas.items():
            for rep in [k for k, s in reps.items() if wall - s.get("time", wall) > STALE_S]:
                del reps[rep]
            for key, gauge in self.replica_gauges.items():
                vals = [s.get(key, 0) for s in reps.values()]
                gauge.labels(model).set(max(vals, default=0) if key == "peak_running" else sum(vals))
        for model in set(self._replicas) | set(self.unassigned):
            queued = self.unassigned.get(model, 0)
            self.router_queued.labels(model).set(queued)
            waiting = sum(s.get("waiting", 0) for s in self._replicas.get(model, {}).values())
            self.replica_gauges["waiting"].labels(model).set(waiting + queued)
        return generate_latest(self.registry)
