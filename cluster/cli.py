"""`adore serve`: a local Ray + Serve running the OpenAI-compatible API until Ctrl-C.

    adore serve                                   # smollm2-135m:adore on http://127.0.0.1:8000/v1
    adore serve --policy adore,full --tp 2 --replicas 2 --port 8000

Registered through the entry-point group `adore.commands` (pyproject.toml), so `adore` itself never
imports Ray. Set ADORE_API_TOKEN to require `Authorization: Bearer <token>` on /v1/*.
"""

from __future__ import annotations

import signal
import sys
import threading
import time


def register(subparsers) -> None:
    from adore.cli import add_model_args

    p = subparsers.add_parser("serve", help="serve the OpenAI-compatible HTTP API on a local Ray + Serve")
    add_model_args(p)
    p.set_defaults(device="auto", dtype="auto", func=cmd_serve)
    g = p.add_argument_group("serving")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica (DeepSpeed AutoTP)")
    g.add_argument("--replicas", type=int, default=1, help="replicas per policy")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to listen on every interface)")
    g.add_argument("--max-batch", type=int, default=16, help="sequences decoded together per replica")
    g.add_argument("--max-queue", type=int, default=64,
                   help="requests allowed to wait per replica (then 503)")
    g.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests Serve sends one replica at a time (default: max-batch + max-queue)")
    g.add_argument("--stream-interval", type=float, default=0.0,
                   help="seconds between a request's stream chunks (0: one per step; raise it for many streams)")
    g.add_argument("--cpus-per-rank", type=float, default=None,
                   help="Ray CPUs reserved per rank (default: an equal share of the cluster's CPUs, at most 1)")
    g.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    g.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    g.add_argument("--ray-temp-dir", default=None, help="temp/session directory of the local Ray instance")


def serve_args(a) -> dict:
    """argparse namespace -> build_app args (cluster/config.py)."""
    from adore.config import knob_values

    out = {"model": a.model, "policies": a.policy, "tp": a.tp, "num_replicas": a.replicas,
           "max_batch": a.max_batch, "max_queue": a.max_queue, "max_prefill_tokens": a.max_prefill_tokens,
           "max_ongoing_requests": a.max_ongoing_requests or a.max_batch + a.max_queue,
           **knob_values(a), "stream_interval_s": a.stream_interval,
           "controller": a.controller, "adapter": getattr(a, "adapter", None), "dtype": a.dtype,
           "device": a.device,
           "cpus_per_rank": a.cpus_per_rank, "threads": a.threads}
    if a.max_seq_len:
        out["max_seq_len"] = a.max_seq_len
    return out


def _stop(*_):
    raise KeyboardInterrupt


def cmd_serve(a) -> int:
    from .config import ServeArgs

    args = serve_args(a)
    cfg = ServeArgs.parse(args)  # user mistakes fail here, before Ray starts

    import ray
    from ray import serve

    from .app import build_app

    # Both stop us the same way. SIGINT explicitly: a parent that ignores it (Ray does, in a process
    # that ran ray.init) passes SIG_IGN on to us, and Ctrl-C would then never reach the loop below.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if a.address:
        ray.init(address=a.address)
    else:
        ray.init(num_cpus=a.num_cpus, _temp_dir=a.ray_temp_dir)
    try:
        res = ray.cluster_resources()
        # what does not fit is said now (UserError: one line, exit 2), not found as requests that wait
        cfg.fit_to_cluster(res.get("CPU", 0.0), res.get("GPU", 0.0), strict=not a.address)
        args.update(cpus_per_rank=cfg.cpus_per_rank, threads=cfg.threads)
        print(f"adore: {cfg.total_ranks} rank(s), {cfg.cpus_per_rank:g} CPU and {cfg.threads or 'all'} torch "
              f"thread(s) each, on {res.get('CPU', 0):g} CPUs", file=sys.stderr, flush=True)
        serve.start(http_options={"host": a.host, "port": a.port})
        serve.run(build_app(args), name="adore", route_prefix="/", blocking=False)
        ids = ", ".join(cfg.model_id(p) for p in cfg.policy_list)
        print(f"adore: serving {ids} at http://{a.host}:{a.port}/v1 (Ctrl-C to stop)", file=sys.stderr,
              flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("adore: shutting down", file=sys.stderr, flush=True)
    finally:
        try:  # a shared cluster keeps its Serve; ours goes, but Ctrl-C must not wait on it forever
            stop = (lambda: serve.delete("adore")) if a.address else serve.shutdown
            if not _within(stop, STOP_TIMEOUT_S):
                print(f"adore: Serve did not stop within {STOP_TIMEOUT_S:.0f}s; stopping Ray", file=sys.stderr,
                      flush=True)
        finally:
            ray.shutdown()  # ends the local Ray we started (its replicas and rank actors with it)
    return 0


STOP_TIMEOUT_S = 45.0


def _within(fn, timeout_s: float) -> bool:
    """Run fn in a daemon thread; False if it is still running after timeout_s."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(timeout_s)
    return not t.is_alive()
