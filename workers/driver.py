"""The loop that drives one shard group: continuous batching, streaming, aborts, a bounded queue.

One asyncio task per shard group owns the engines (they are not thread-safe): it collects the
commands queued since the last step (new requests, aborts), sends them with the next step to every
rank, and hands rank 0's outputs to each request's asyncio.Queue. New requests therefore join the
running batch at the next step; an abort frees its row at the next step (one step at most, tens of
milliseconds). The loop sleeps while there is nothing to do.

    driver = AsyncDriver(group, max_queue=64)
    rid = driver.submit(ids, params)          # raises Overloaded when the queue is full
    async for outs in driver.stream(rid):     # lists of StepOutput; the last one has finished=True
        ...                                   # leaving the loop early (disconnect) aborts the request
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid

from adore.config import SamplingParams, UserError

from .group import ShardGroup

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The replica's waiting queue is full (HTTP 503 with Retry-After)."""

    def __init__(self, waiting: int, retry_after_s: float) -> None:
        super().__init__(f"server overloaded: {waiting} requests already waiting; retry later")
        self.retry_after_s = retry_after_s


class EngineFailed(RuntimeError):
    """The shard group is gone (a rank died, or the ranks diverged): this replica serves no more
    requests and must be replaced (HTTP 503 with Retry-After while that happens)."""


_DONE = object()


class AsyncDriver:
    def __init__(self, group: ShardGroup, *, max_queue: int = 64, on_failure=None) -> None:
        self.group, self.max_batch, self.max_queue = group, group.spec.max_batch, max_queue
        self.on_failure = on_failure  # called once, with the exception, when the shard group is lost
        self._pending: list[tuple] = []
        self._queues: dict[str, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._failed: BaseException | None = None
        self._ids = itertools.count()
        self.engine_busy = False  # rank 0 still has rows or waiting requests
        self.n_active = self.n_waiting = 0
        self.peak_active = 0
        self.stats: dict = {}
        self.step_s = 0.0  # moving average of the step time
        self._stepping = False
        self.request_s = 0.0  # moving average of a request's time in a row (first token -> last)
        self._first_at: dict[str, float] = {}

    # -- load ----------------------------------------------------------------------------------
    @property
    def live(self) -> int:
        """Requests submitted and not finished (queued, waiting in the engine, or decoding)."""
        return len(self._queues)

    @property
    def waiting(self) -> int:
        return max(0, self.live - self.max_batch)

    def retry_after_s(self) -> float:
        """When a request arriving now could expect a row: the queue ahead of it drains max_batch
        requests per mean request duration (until one has finished: one row per step)."""
        if self.request_s > 0:
            return max(1.0, (self.waiting + 1) / self.max_batch * self.request_s)
        return max(1.0, self.waiting * max(self.step_s, 0.01))

    def snapshot(self) -> dict:
        return {"running": min(self.live, self.max_batch), "waiting": self.waiting, "live": self.live,
                "healthy": self.healthy, "peak_running": self.peak_active, "step_s": round(self.step_s, 5),
                "released": self.stats.get("released", 0), "rebuilt": self.stats.get("rebuilt", 0),
                "steps": self.stats.get("steps", 0), "decode_tokens": self.stats.get("decode_tokens", 0),
                "prefill_tokens": self.stats.get("prefill_tokens", 0),
                "stored_tokens": self.stats.get("stored_tokens", 0)}

    @property
    def healthy(self) -> bool:
        return self._failed is None

    @property
    def idle(self) -> bool:
        """No step in flight and nothing to do (a dead rank would go unnoticed until the next step)."""
        return not self._pending and not self.engine_busy and not self._stepping

    # -- requests ------------------------------------------------------------------------------
    def submit(self, ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request for the next step. Must be called from the driver's event loop."""
        if self._failed is not None:
            raise EngineFailed(f"engine loop failed: {self._failed!r}")
        if self.waiting >= self.max_queue and self.live >= self.max_batch:
            raise Overloaded(self.waiting, self.retry_after_s())
        if params.temperature > 0 and params.seed is None:
            # every rank must draw the same tokens: fix the seed here, once, for all of them
            params = SamplingParams(**{**params.__dict__, "seed": uuid.uuid4().int & (2**63 - 1)})
        rid = request_id or f"r{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        self._queues[rid] = asyncio.Queue()
        self._pending.append(("add", rid, list(ids), params))
        self._ensure_loop()
        self._wake.set()
        return rid

    def abort(self, rid: str) -> None:
        """Drop a request (client gone): its engine row is freed at the next step."""
        self._first_at.pop(rid, None)
        if self._queues.pop(rid, None) is not None:
            self._pending.append(("abort", rid))
            if self._wake is not None:
                self._wake.set()

    async def stream(self, rid: str):
        """Yield lists of StepOutput for `rid` until one has finished=True. Leaving early aborts."""
        q = self._queues.get(rid)
        if q is None:  # aborted before anyone listened
            return
        finished = False
        try:
            while not finished:
                item = await q.get()
                batch = [item]
                while not q.empty():  # coalesce what piled up while the consumer was busy
                    batch.append(q.get_nowait())
                if any(b is _DONE for b in batch):
                    raise EngineFailed(f"engine loop failed: {self._failed!r}")
                for b in batch:
                    if isinstance(b, Exception):
                        raise b
                finished = any(o.finished for o in batch)
                yield batch
        finally:
            if not finished:
                self.abort(rid)
            self._queues.pop(rid, None)

    # -- the loop ------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        try:
            while True:
                if not self._pending and not self.engine_busy:
                    self._wake.clear()
                    await self._wake.wait()
                cmds, self._pending = self._pending, []
                t0 = time.perf_counter()
                self._stepping = True
                try:
                    res = await self.group.step(cmds)
                finally:
                    self._stepping = False
                self._dispatch(res, time.perf_counter() - t0)
                await asyncio.sleep(0)  # let handlers enqueue between steps
        except Exception as e:  # a rank died or diverged: fail every live request
            log.exception("engine loop failed")
            self._failed = e
            for q in self._queues.values():
                q.put_nowait(_DONE)
            if self.on_failure is not None:
                self.on_failure(e)

    def _dispatch(self, res, dt: float) -> None:
        self.engine_busy = res.n_active > 0 or res.n_waiting > 0
        rows = res.stats.get("decode_tokens", 0) - self.stats.get("decode_tokens", 0)  # rows this step
        self.peak_active = max(self.peak_active, rows)
        self.n_active, self.n_waiting, self.stats = res.n_active, res.n_waiting, res.stats
        if res.outputs:
            self.step_s = dt if self.step_s == 0 else 0.9 * self.step_s + 0.1 * dt
        for rid, msg in res.errors.items():
            q = self._queues.get(rid)
            if q is not None:
                q.put_nowait(UserError(msg))
        now = time.monotonic()
        for o in res.outputs:
            t = self._first_at.setdefault(o.request_id, now)
            if o.finished:
                del self._first_at[o.request_id]
                if o.finish_reason in ("stop", "length"):
                    d = now - t
                    self.request_s = d if self.request_s == 0 else 0.9 * self.request_s + 0.1 * d
            q = self._queues.get(o.request_id)
            if q is not None:  # None: aborted meanwhile
                q.put_nowait(o)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except BaseException:
                pass
