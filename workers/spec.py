"""What one shard group runs: the model, the KV policy and the engine's sizes, as plain data.

An EngineSpec travels to every rank actor (it pickles), and each rank builds the same engine from it,
so the ranks start from identical state: the precondition for lock-step decoding.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from adore.config import AdoreConfig, UserError


@dataclass
class EngineSpec(AdoreConfig):
    """The method's knobs are the AdoreConfig fields this class extends (cache_size, top_k, ...):
    a new knob needs no change here."""

    model: str = "smollm2-135m"
    policy: str = "adore"
    controller: str | None = None  # controller checkpoint (.safetensors); None: the shipped default
    adapter: str | None = None  # LoRA adapter directory (`adore finetune`), merged before sharding
    dtype: str = "float32"
    device: str = "cpu"  # "cpu" or "cuda" (each GPU rank sees exactly one device: cuda:0)
    max_batch: int = 8  # engine rows: sequences decoded together
    max_seq_len: int = 2048  # prompt + generation per sequence
    max_prefill_tokens: int | None = None  # prompt tokens per engine step (longer: chunked); None: by device
    threads: int | None = None  # torch intra-op threads per rank (None: leave torch's choice)
    seed: int = 0  # weights seed of random:<shape> models (all ranks must agree)
    dist_timeout_s: float = 600.0  # a collective that waits longer than this fails instead of hanging
    # decode steps replayed from CUDA graphs: "auto" on one GPU and off under tp (the graph would hold
    # the all-reduces of o_proj/down_proj; not yet measured on two GPUs), "on", "off"
    cuda_graphs: str = "auto"

    def __post_init__(self) -> None:
        prefill_ok = self.max_prefill_tokens is None or self.max_prefill_tokens >= 1  # None: by device
        if self.max_batch < 1 or self.max_seq_len < 2 or not prefill_ok:
            raise UserError("max_batch >= 1, max_seq_len >= 2 and max_prefill_tokens >= 1 are required")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"device must be cpu or cuda, got {self.device!r}")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise UserError(f"cuda_graphs must be auto, on or off, got {self.cuda_graphs!r}")
        super().__post_init__()  # the method's numbers, checked early, in the caller's process

    @property
    def uses_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def graphs(self) -> bool | None:
        """Engine(cuda_graphs=...): None (auto), True or False."""
        return {"auto": None, "on": True, "off": False}[self.cuda_graphs]

    def replace(self, **kw) -> EngineSpec:
        return EngineSpec(**{**asdict(self), **kw})

    def load_model(self, device: str):
        """(model, tokenizer, ModelInfo) with the adapter, if any, merged into plain Linear weights."""
        from adore.models import load_model

        model, tok, info = load_model(self.model, dtype=self.dtype, device=device, seed=self.seed)
        if self.adapter:
            from adore.train.finetune import apply_adapter

            if not os.path.isdir(self.adapter):
                raise UserError(f"adapter directory not found: {self.adapter}")
            model, info = apply_adapter(model, info, self.adapter)
        return model, tok, info

    def make_policy(self):
        """The policy object (loads the controller checkpoint if one was given)."""
        from adore.policies import make_policy

        return make_policy(self.policy, self, self.controller or None)
