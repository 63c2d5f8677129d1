"""CUDA graphs for the decode step.

A bounded policy makes the step's shapes static: a fixed pool of B rows, a fixed number of query rows
per sequence, a fixed slot capacity. The layers of such a step (embedding, every decoder layer with
its slot attention, the final norm) are captured once per shape and replayed, which removes the
per-kernel launch and Python overhead (hundreds of launches per step on a 32-layer model: the
dominant cost at small batch). The controller and the release decision stay eager: they are a few
small ops.

Shapes vary in two ways, each captured lazily and cached:
  rows    1 + the most rebuilds any sequence makes this step (promote mode varies it, 1..R+1)
  used    slots read, rounded up to a multiple of `slot_bucket` (only full attention grows)
Inactive rows of the pool are padded (position -1: they attend to nothing and write to the trash
slot), so one graph serves any number of active sequences.
"""

from __future__ import annotations

import torch

from .attention import forward_slots
from .cache import SlotCache


class _Captured:
    def __init__(self, graph, ids, row_pos, slots, hidden, mass):
        self.graph, self.ids, self.row_pos, self.slots, self.hidden, self.mass = (
            graph, ids, row_pos, slots, hidden, mass)


class GraphedDecoder:
    def __init__(self, model, cache: SlotCache, top_k: int | None, want_mass: bool,
                 queries: torch.Tensor | None = None, slot_bucket: int = 256) -> None:
        if cache.k.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and cache on a CUDA device")
        self.model, self.cache, self.top_k, self.want_mass = model, cache, top_k, want_mass
        self.queries = queries  # [L, B, Hq, D], written by every replay (forward_slots' `queries`)
        self.slot_bucket = slot_bucket
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def _bucket(self, used: int) -> int:
        b = -(-used // self.slot_bucket) * self.slot_bucket
        return min(b, self.cache.capacity)

    def __call__(self, ids: torch.Tensor, row_pos: torch.Tensor, slots: torch.Tensor):
        """Same contract as forward_slots for the first n rows: ids, row_pos, slots [n, R]."""
        n, rows = ids.shape
        c = self.cache  # a bounded cache fits one bucket: no need to find (with a device sync) what it uses
        key = (rows, c.capacity if c.capacity <= self.slot_bucket else self._bucket(c.used_slots(n)))
        g = self.graphs.get(key) or self._capture(*key)
        g.ids.zero_()
        g.row_pos.fill_(-1)
        g.slots.fill_(self.cache.trash)
        g.ids[:n], g.row_pos[:n], g.slots[:n] = ids, row_pos, slots
        g.graph.replay()
        return g.hidden[:n], (g.mass[:n] if g.mass is not None else None)

    def _capture(self, rows: int, used: int) -> _Captured:
        B, dev = self.cache.batch, self.cache.k.device
        ids = torch.zeros(B, rows, dtype=torch.long, device=dev)
        row_pos = torch.full((B, rows), -1, dtype=torch.long, device=dev)
        slots = torch.full((B, rows), self.cache.trash, dtype=torch.long, device=dev)

        def run():
            return forward_slots(self.model, self.cache, ids, row_pos, slots, top_k=self.top_k,
                                 want_mass=self.want_mass, used=used, queries=self.queries)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles kernels, settles allocations
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden, mass = run()
        g = _Captured(graph, ids, row_pos, slots, hidden, mass)
        self.graphs[(rows, used)] = g
        return g
