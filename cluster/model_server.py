"""A model replica: one shard group (tp rank actors in this replica's placement group) + its driver.

Serve gives each replica a placement group of `tp` bundles (STRICT_PACK); the replica actor itself
takes no resources and sits in bundle 0 beside rank 0, rank i goes to bundle i. The ranks are owned
by the replica, so they end with it (no leaked actors); `__del__`, which Serve calls on graceful
shutdown, also leaves the process group first.

`generate(request)` is a Serve streaming method. It yields plain dicts:

    {"event": "start", "prompt_tokens": n}
    {"event": "delta", "text": "...", "tokens": k, "finish_reason": None | "stop" | "length", ...}
    {"event": "error", "status": 400 | 500 | 503, "message": ..., ...}   (instead of "start", or last)

If the caller goes away (HTTP client disconnect -> Serve cancels the request), the generator is
closed and the request is aborted in the engine at once.

Failure handling: tokenising runs on one worker thread, never on the replica's event loop (a huge
prompt must not stall the other streams). A request the engine fails on ends with a 500 event and
the others go on. If the shard group dies (a rank killed), in-flight streams end with a 503 event at
once and new requests get 503 with Retry-After (an estimate of a replacement's start); a moment later
the replica process exits (as vLLM's server does when its engine dies), which Serve sees at its next
health check (every 2 s) as a crashed replica and replaces at once. (A failing `check_health` would
need three checks in a row.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing

from ray import serve
from ray.util import metrics as ray_metrics
from ray.util.placement_group import get_current_placement_group

from adore.config import SamplingParams, UserError
from workers import AsyncDriver, EngineFailed, Overloaded, ShardGroup

from .config import ServeArgs
from .errors import ApiError, bad_request, overloaded

log = logging.getLogger("ray.serve")
STATS_EVERY_S = 1.0  # a replica's load snapshot rides on a stream chunk at most this often
RANK_PING_TIMEOUT_S = 10.0
EXIT_AFTER_FAILURE_S = 1.0  # time for the error events of in-flight streams to reach their clients


def replica_actor_name() -> str | None:
    """This replica's Ray actor name (namespace "serve"): the ingress checks it is alive."""
    try:
        return serve.get_replica_context().replica_id.to_full_id_str()
    except Exception:
        return None


def replica_id() -> str:
    try:
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        return getattr(rid, "unique_id", None) or str(rid or ctx.replica_tag)
    except Exception:
        return "local"


async def paced(stream, interval_s: float):
    """Regroup a request's lists of outputs so that one goes out at most every `interval_s` seconds.

    The first list and the one that finishes the request go at once; 0 passes every list through.
    (Each chunk costs the replica's event loop ~0.2 ms in Serve's streaming, per request per step.)
    """
    held: list = []
    sent_at = None
    async with aclosing(stream):
        async for outs in stream:
            held.extend(outs)
            now = time.monotonic()
            if held[-1].finished or sent_at is None or now - sent_at >= interval_s:
                sent_at, out, held = now, held, []
                yield out


class ModelServer:
    def __init__(self, args: dict, policy: str) -> None:
        t0 = time.monotonic()
        self.cfg = ServeArgs.parse(args)
        self.policy, self.model_id = policy, self.cfg.model_id(policy)
        spec = self.cfg.engine_spec(policy)
        self.group = ShardGroup(spec, self.cfg.tp, placement_group=get_current_placement_group(),
                                cpus_per_rank=self.cfg.cpus_per_rank or 1.0)
        self.tok = self.group.tokenizer()
        self.driver = AsyncDriver(self.group, max_queue=self.cfg.max_queue, on_failure=self._engine_lost)
        self.replica, self.actor_name = replica_id(), replica_actor_name()
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._last_stats = 0.0
        tags = {"model": self.model_id, "replica": self.replica}
        keys = tuple(tags)
        self._gauges = {k: ray_metrics.Gauge(f"adore_replica_{k}", f"ADORE replica {k}", tag_keys=keys)
                        for k in ("running", "waiting", "released", "rebuilt", "steps", "decode_tokens")}
        for g in self._gauges.values():
            g.set_default_tags(tags)
        self._last_push = 0.0
        init_s = time.monotonic() - t0
        # Retry-After while a replacement starts: its processes also start and import torch (about as
        # long again as this init), plus Serve's health-check period to notice the failure.
        self.restart_s = 2 * init_s + 2.0
        log.info("model %s ready in %.1f s: tp=%d %s", self.model_id, init_s, self.cfg.tp,
                 self.group.info)

    def _engine_lost(self, exc: BaseException) -> None:
        log.error("model %s: the shard group failed (%r); exiting in %.0f s so that Serve replaces this "
                  "replica", self.model_id, exc, EXIT_AFTER_FAILURE_S)
        asyncio.get_running_loop().call_later(EXIT_AFTER_FAILURE_S, os._exit, 1)

    def _unavailable(self) -> ApiError:
        return ApiError(503, f"the replica of {self.model_id} failed and is being replaced; retry later",
                        code="unavailable", retry_after_s=self.restart_s)

    # -- requests ------------------------------------------------------------------------------
    def _encode(self, req: dict) -> list[int]:
        tok = self.tok
        if req["kind"] == "chat":
            try:
                text = tok.apply_chat_template(req["messages"], tokenize=False, add_generation_prompt=True)
            except Exception as e:
                raise bad_request(f"messages: cannot apply the chat template: {e}",
                                  param="messages") from None
            return list(tok.encode(text, add_special_tokens=False))
        p = req["prompt"]
        if isinstance(p, str):
            return list(tok.encode(p, add_special_tokens=True))
        return [int(t) for t in p]

    def _prepare(self, req: dict) -> tuple[list[int], SamplingParams]:
        ids = self._encode(req)
        param = "messages" if req["kind"] == "chat" else "prompt"
        if not ids:
            raise bad_request(f"{param}: the prompt is empty", param=param)
        vocab = self.group.info[0]["vocab_size"]
        if min(ids) < 0 or max(ids) >= vocab:
            raise bad_request(f"prompt: token ids must be in [0, {vocab})", param="prompt")
        limit = self.cfg.max_seq_len
        s = dict(req["sampling"])
        if s["max_tokens"] is None:  # OpenAI: completions default to 16, chat to what fits
            s["max_tokens"] = 16 if req["kind"] == "completion" else limit - len(ids)
        if len(ids) >= limit:
            raise bad_request(f"{param}: the prompt has {len(ids)} tokens; this model's context is {limit} "
                              f"tokens (prompt + max_tokens)", param=param, code="context_length_exceeded")
        if len(ids) + s["max_tokens"] > limit:
            raise bad_request(f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({s['max_tokens']}) "
                              f"exceeds this model's context of {limit} tokens", param="max_tokens",
                              code="context_length_exceeded")
        try:
            return ids, SamplingParams(**s)
        except UserError as e:
            raise bad_request(str(e)) from None

    async def generate(self, req: dict):
        """Stream one request's events (see the module docstring)."""
        if not self.driver.healthy:
            yield self._unavailable().as_event()
            return
        try:
            loop = asyncio.get_running_loop()
            ids, params = await loop.run_in_executor(self._tokenize, self._prepare, req)
            rid = self.driver.submit(ids, params)
        except ApiError as e:
            yield e.as_event()
            return
        except Overloaded as e:
            yield overloaded(str(e), self.cfg.retry_after_s or e.retry_after_s).as_event()
            return
        except EngineFailed:
            yield self._unavailable().as_event()
            return
        try:
            yield {"event": "start", "prompt_tokens": len(ids), "replica": self.replica}
            async with aclosing(paced(self.driver.stream(rid), self.cfg.stream_interval_s)) as stream:
                async for outs in stream:
                    last = outs[-1]
                    if last.finished and last.finish_reason == "error":
                        log.error("request %s failed in the engine: %s", rid, last.error)
                        yield ApiError(500, f"the engine failed on this request ({last.error})",
                                       code="internal_error").as_event()
                        return
                    ev = {"event": "delta", "text": "".join(o.text for o in outs),
                          "tokens": sum(o.token_id is not None for o in outs),
                          "finish_reason": last.finish_reason if last.finished else None}
                    now = time.monotonic()
                    if last.finished or now - self._last_stats >= STATS_EVERY_S:
                        self._last_stats = now
                        ev["stats"] = self.stats_now()
                    yield ev
                    self._push_metrics()
        except UserError as e:
            yield bad_request(str(e)).as_event()
        except EngineFailed:
            yield self._unavailable().as_event()
        finally:  # cancelled or closed early (client gone): free the engine row now; no-op when done
            self.driver.abort(rid)

    # -- state ---------------------------------------------------------------------------------
    def stats_now(self) -> dict:
        return {"model": self.model_id, "replica": self.replica, "actor": self.actor_name,
                "restart_s": round(self.restart_s, 2), "rank_pids": [i.get("pid") for i in self.group.info],
                "time": time.time(), **self.driver.snapshot()}

    async def stats(self) -> dict:
        await asyncio.sleep(0)
        return self.stats_now()

    def _push_metrics(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_push < 0.5:
            return
        self._last_push = now
        s = self.driver.snapshot()
        for k, g in self._gauges.items():
            g.set(s[k])

    async def check_health(self) -> None:
        """Serve's health check (every few seconds): the engine loop is alive, and, when it is idle,
        every rank answers. (While it steps, a dead rank fails the step at once: no ping needed, and a
        ping would only queue behind a long step.)"""
        if not self.driver.healthy:
            raise RuntimeError("engine loop failed: a rank died or the ranks diverged")
        if not self.driver.idle:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*(a.__ray_ready__.remote() for a in self.group.actors)),
                                   RANK_PING_TIMEOUT_S)
        except asyncio.TimeoutError:
            if self.driver.idle:
                raise RuntimeError("a tensor-parallel rank did not answer a ping") from None
        except Exception as e:
            raise RuntimeError(f"a tensor-parallel rank is gone: {e!r}") from None

    def __del__(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:
            self.group = None
            group.shutdown()
