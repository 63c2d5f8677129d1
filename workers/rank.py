"""One tensor-parallel rank: a Ray actor holding a model shard and its own ADORE engine.

Every rank builds the same engine (same spec, same weights seed) over its shard and applies the same
command list before each step, so all ranks make the same admissions, the same release/rebuild
choices and the same token picks: their collectives (the all-reduces inside o_proj/down_proj) line up.
Commands:

    ("add", request_id, prompt_ids, SamplingParams)   queue a request (joins at the next free row)
    ("abort", request_id)                             drop it now, its row frees at once

`run(commands)` applies them in order, then runs one engine step if there is work, and returns a
StepResult. The class is plain Python; ShardGroup wraps it with ray.remote.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from .spec import EngineSpec

Command = tuple  # ("add", rid, ids, params) | ("abort", rid)


@dataclass
class StepResult:
    outputs: list  # [StepOutput] of this step
    errors: dict[str, str] = field(default_factory=dict)  # request id -> why add_request refused it
    n_active: int = 0  # rows decoding after the step
    n_waiting: int = 0  # requests queued in the engine, not yet in a row
    stats: dict = field(default_factory=dict)  # Engine.stats (released, rebuilt, steps, ...)
    step_s: float = 0.0  # wall time of the engine step on this rank

    def signature(self) -> list[tuple]:
        """What every rank must agree on after a step (checked by ShardGroup)."""
        return [(o.request_id, o.token_id, o.finished) for o in self.outputs]


class RankWorker:
    def __init__(self, spec: EngineSpec, rank: int, world: int) -> None:
        from . import dist

        dist.rank_env(rank, world, spec.device)
        self.spec, self.rank, self.world = spec, rank, world
        self.engine = None
        self.tok = None
        if spec.threads:
            import torch

            torch.set_num_threads(spec.threads)

    def address(self) -> tuple[str, int]:
        """Rendezvous address for the process group (asked of rank 0 only)."""
        from .dist import free_port, node_ip

        return node_ip(), free_port()

    def setup(self, addr: str | None = None, port: int | None = None) -> dict:
        """Load the model, join the process group and shard (tp > 1), build the engine."""
        from adore.engine import Engine

        from . import dist

        t0 = time.perf_counter()
        spec = self.spec
        policy = spec.make_policy()
        device = "cuda:0" if spec.uses_gpu else "cpu"
        if self.world > 1:
            dist.init_group(self.rank, self.world, addr, port, spec.device, spec.dist_timeout_s)
            # AutoTP slices the weights and moves them to this rank's device. On a GPU the whole model
            # is built there first (random weights: the same seed gives every rank the same values, and
            # initialising on the GPU is minutes faster than on one CPU core); on CPU it stays put.
            model, tok, info = spec.load_model(device)
            model = dist.shard_model(model, self.world)
        else:
            model, tok, info = spec.load_model(device)
        self.tok = tok
        self.engine = Engine(model, tok, policy, info=info, max_batch=spec.max_batch,
                             max_seq_len=spec.max_seq_len, max_prefill_tokens=spec.max_prefill_tokens,
                             cuda_graphs=spec.graphs)
        t1 = time.perf_counter()
        self.engine.warm_up()  # the first users do not pay for cold memory and first-use kernels
        return {"rank": self.rank, "world": self.world, "pid": os.getpid(), "device": str(self.engine.device),
                "kv_heads_local": self.engine.cache.k.shape[2], "load_s": round(t1 - t0, 2),
                "warmup_s": round(time.perf_counter() - t1, 2),
                "vocab_size": self.engine.vocab_size}

    def tokenizer(self):
        """The tokenizer (pickled to the caller, which tokenizes and validates prompts itself)."""
        return self.tok

    def run(self, commands: list[Command]) -> StepResult:
        from adore.config import UserError

        eng = self.engine
        errors: dict[str, str] = {}
        for cmd in commands:
            if cmd[0] == "add":
                _, rid, ids, params = cmd
                try:
                    eng.add_request(ids, params, request_id=rid)
                except UserError as e:  # identical on every rank: same inputs, same checks
                    errors[rid] = str(e)
            elif cmd[0] == "abort":
                eng.abort(cmd[1])
            else:
                raise ValueError(f"unknown command {cmd[0]!r}")
        t0 = time.perf_counter()
        outs = eng.step() if eng.has_work() else []
        dt = time.perf_counter() - t0
        eng.release_finished()
        return StepResult(outs, errors, eng.n_active, len(eng.waiting), dict(eng.stats), dt)

    def shutdown(self) -> bool:
        """Leave the process group (no hung group on exit) and drop the engine."""
        import gc

        from .dist import destroy_group

        # Graphs that captured NCCL collectives go before the group: destroying a communicator a live
        # graph still holds can hang (pytorch/pytorch#115388).
        self.engine = None
        gc.collect()
        if self.spec.uses_gpu:
            import torch

            torch.cuda.synchronize()
        destroy_group()
        return True
