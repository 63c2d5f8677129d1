"""Ray actors that host the ADORE engine, one per tensor-parallel rank.

    spec = EngineSpec(model="random:tiny-gqa", policy="adore", max_batch=8)
    group = ShardGroup(spec, tp=2)          # placement group (STRICT_PACK) + 2 rank actors + gloo/NCCL
    driver = AsyncDriver(group)             # one asyncio loop steps every rank in lock-step
    rid = driver.submit(prompt_ids, SamplingParams(max_tokens=32))
    async for outs in driver.stream(rid): ...
    group.shutdown()

Nothing here knows about HTTP (that is cluster/); `adore` never imports this package.
"""

from .driver import AsyncDriver, EngineFailed, Overloaded
from .group import ShardGroup
from .spec import EngineSpec

__all__ = ["AsyncDriver", "EngineFailed", "EngineSpec", "Overloaded", "ShardGroup"]
