"""A shard group: N rank actors of one model replica, in one STRICT_PACK placement group.

    group = ShardGroup(spec, tp=2)              # creates its own placement group, or
    group = ShardGroup(spec, tp=2, placement_group=pg)   # uses bundles [0, tp) of the caller's
    result = group.step_sync([("add", "r1", ids, params)])  # or: await group.step(...)
    group.shutdown()

Bundles: {"GPU": 1, "CPU": c} per rank on GPU nodes, {"CPU": c} otherwise; STRICT_PACK keeps every
rank of the replica on one node (tensor parallelism all-reduces twice per layer). Every command list
goes to every rank (the same Ray call with the same arguments); the ranks' step results must agree,
which is checked each step, so a divergence fails loudly instead of deadlocking a later collective.
"""

from __future__ import annotations

import asyncio

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .rank import Command, RankWorker, StepResult
from .spec import EngineSpec


class RanksDiverged(RuntimeError):
    pass


def bundles(tp: int, cpus_per_rank: float = 1, gpu: bool = False) -> list[dict]:
    """Placement-group bundles for one replica's ranks (rank i goes to bundle i)."""
    b = {"CPU": cpus_per_rank}
    if gpu:
        b["GPU"] = 1
    return [dict(b) for _ in range(tp)]


class ShardGroup:
    def __init__(self, spec: EngineSpec, tp: int = 1, *, placement_group=None, cpus_per_rank: float = 1,
                 ready_timeout_s: float = 600.0) -> None:
        if tp < 1:
            raise ValueError("tp >= 1")
        self.spec, self.tp = spec, tp
        self._own_pg = placement_group is None
        if self._own_pg:
            placement_group = _make_pg(bundles(tp, cpus_per_rank, spec.uses_gpu), ready_timeout_s)
        self.pg = placement_group
        self.actors = []
        try:
            cls = ray.remote(RankWorker)
            for r in range(tp):
                strat = PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                         placement_group_bundle_index=r)
                self.actors.append(cls.options(
                    num_cpus=cpus_per_rank, num_gpus=1 if spec.uses_gpu else 0, scheduling_strategy=strat,
                    name=None, max_restarts=0).remote(spec, r, tp))
            addr, port = ray.get(self.actors[0].address.remote()) if tp > 1 else (None, None)
            self.info = ray.get([a.setup.remote(addr, port) for a in self.actors], timeout=ready_timeout_s)
            self._tok = None
        except BaseException:
            self.shutdown()
            raise

    def tokenizer(self):
        if self._tok is None:
            self._tok = ray.get(self.actors[0].tokenizer.remote())
        return self._tok

    def _submit(self, commands: list[Command]):
        return [a.run.remote(commands) for a in self.actors]

    def _check(self, results: list[StepResult]) -> StepResult:
        first = results[0]
        sig = first.signature()
        for r, res in enumerate(results[1:], 1):
            if res.signature() != sig or res.errors != first.errors:
                raise RanksDiverged(f"rank {r} disagrees with rank 0 after a step: "
                                    f"{res.signature()} != {sig}")
        return first  # rank 0 streams

    async def step(self, commands: list[Command]) -> StepResult:
        """Apply `commands` on every rank, run one lock-step engine step, return rank 0's result."""
        return self._check(list(await asyncio.gather(*self._submit(commands))))

    def step_sync(self, commands: list[Command]) -> StepResult:
        return self._check(ray.get(self._submit(commands)))

    def alive(self, timeout_s: float = 30.0) -> bool:
        try:
            ray.get([a.__ray_ready__.remote() for a in self.actors], timeout=timeout_s)
            return True
        except Exception:
            return False

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Leave the process group on every rank, then end the actors (and our placement group)."""
        actors, self.actors = self.actors, []
        if actors:
            try:
                ray.get([a.shutdown.remote() for a in actors], timeout=timeout_s)
            except Exception:
                pass  # a rank stuck in a collective: killing the actors below ends it
            for a in actors:
                ray.kill(a, no_restart=True)
        if self._own_pg and self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


def _make_pg(bundle_list: list[dict], timeout_s: float):
    pg = placement_group(bundle_list, strategy="STRICT_PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except Exception:
        remove_placement_group(pg)
        raise TimeoutError(f"placement group {bundle_list} (STRICT_PACK) not schedulable in {timeout_s}s; "
                           f"cluster resources: {ray.available_resources()}") from None
    return pg
