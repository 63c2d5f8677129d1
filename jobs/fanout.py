"""Spreading cells over workers: Ray actors (one GPU, or `cpus_per_cell` CPUs, each) or, with
--local, the driver process itself.

The driver keeps every actor busy with one cell at a time and hands an idle actor the next cell of
the model it already holds (so a model loads once per actor, not once per cell); each finished row is
passed to `on_row` at once, which writes it. A cell that raises comes back as an error row from the
actor; an actor that dies (segfault, OOM kill) is recorded as an error row for its cell and replaced.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import deque
from collections.abc import Callable

from .grid import describe_cell
from .runner import CellRunner
from .schema import cell_columns


def crash_row(cell: dict, err: BaseException) -> dict:
    """The row of a cell whose worker died before it could answer."""
    return {**cell_columns(cell), "status": "error",
            "error": f"worker died: {type(err).__name__}: {err}"[:4000],
            "finished_at": dt.datetime.now(dt.timezone.utc)}


def run_local(cells: list[dict], sources: dict, on_row: Callable[[dict], None], threads: int = 1) -> None:
    """Every cell in this process, one after another (debugging, or machines without Ray), with
    `threads` torch threads as a Ray worker with that CPU share would have."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        runner = CellRunner(sources)
        for cell in sorted(cells, key=lambda c: (c["model"], c["dtype"])):
            on_row(runner.run(cell))
    finally:
        torch.set_num_threads(before)


def plan_workers(resources: dict, cluster: dict, n_cells: int) -> tuple[int, dict]:
    """(number of actors, actor options) for the cluster's resources and the config's `resources`."""
    gpus = int(cluster.get("GPU", 0))
    want_gpu = resources.get("gpus_per_cell", "auto")
    use_gpu = gpus > 0 and want_gpu not in (0, False, "0", "no", "none")
    cpus_per_cell = float(resources.get("cpus_per_cell") or 1)
    if use_gpu:
        slots = gpus
        opts = {"num_gpus": 1, "num_cpus": min(cpus_per_cell, max(cluster.get("CPU", 1) / gpus, 1))}
    else:
        slots = int(cluster.get("CPU", 1) // cpus_per_cell)
        opts = {"num_cpus": cpus_per_cell}
    n = max(1, min(slots, n_cells, resources.get("workers") or slots))
    return n, opts


def _actor_class():
    import ray

    @ray.remote(max_restarts=0)
    class CellActor:
        """A worker process: one CellRunner, threads matched to its CPU share."""

        def __init__(self, sources: dict, threads: int) -> None:
            import torch

            torch.set_num_threads(max(1, threads))
            self.runner = CellRunner(sources)

        def run(self, cell: dict) -> dict:
            return self.runner.run(cell)

    return CellActor


def run_ray(cells: list[dict], sources: dict, resources: dict, on_row: Callable[[dict], None],
            log: Callable[[str], None] = print) -> None:
    """Fan cells out over Ray actors; returns when every cell has a row."""
    import ray
    from ray.exceptions import RayError

    n, opts = plan_workers(resources, ray.cluster_resources(), len(cells))
    log(f"{n} worker(s), each {opts}")
    actor_cls = _actor_class()
    src_ref = ray.put(sources)
    threads = int(opts.get("num_cpus", 1))
    # Ray starts workers at niceness 15; a benchmark cell should compete for its CPU share like any
    # other process on the machine (the job's own driver runs at 0 too).
    env = {"OMP_NUM_THREADS": str(max(1, threads)), "RAY_worker_niceness": "0"}
    for k in ("ADORE_EVAL_FAULT", "ADORE_EVAL_CELL_DELAY", "ADORE_CACHE_DIR", "HF_HUB_OFFLINE"):
        if k in os.environ:
            env[k] = os.environ[k]
    make = lambda: actor_cls.options(**opts, runtime_env={"env_vars": env}).remote(src_ref, threads)

    pending: deque[dict] = deque(sorted(cells, key=lambda c: (c["model"], c["dtype"])))
    idle = [make() for _ in range(n)]
    holds: dict = {}  # actor -> (model, dtype) of its last cell
    running: dict = {}  # ObjectRef -> (actor, cell)

    def next_for(actor):
        key = holds.get(actor)
        for i, c in enumerate(pending):
            if (c["model"], c["dtype"]) == key:
                del pending[i]
                return c
        return pending.popleft()

    while pending or running:
        while idle and pending:
            actor = idle.pop()
            cell = next_for(actor)
            holds[actor] = (cell["model"], cell["dtype"])
            running[actor.run.remote(cell)] = (actor, cell)
        ready, _ = ray.wait(list(running), num_returns=1)
        actor, cell = running.pop(ready[0])
        try:
            row = ray.get(ready[0])
            idle.append(actor)
        except RayError as e:  # the actor died (crash, OOM kill) or its call failed outside the runner
            log(f"worker died on {describe_cell(cell)}; starting a new one")
            row = crash_row(cell, e)
            holds.pop(actor, None)
            ray.kill(actor)
            idle.append(make())
        on_row(row)
    for actor in idle:
        ray.kill(actor)
