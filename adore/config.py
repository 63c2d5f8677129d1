"""Configuration dataclasses: the method's knobs and a request's sampling parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Temperatures below this decode greedily: dividing logits by a smaller number overflows float32
# (1e-50 is 0 in float32, and x / 0 gives inf and NaN probabilities). vLLM draws the same line.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 2.0  # OpenAI's bound
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a signed 64-bit seed (torch takes [-2^63, 2^64))


class UserError(ValueError):
    """A mistake in what the user asked for (unknown model, bad number, missing file).

    The CLI prints these as one line and exits with code 2; the server maps them to HTTP 400."""


@dataclass
class AdoreConfig:
    """Budget and method parameters shared by every KV policy.

    cache_size:   m, KV entries kept per sequence between steps (None: unbounded, full attention)
    top_k:        K, keys each query row keeps (per head) after scoring; None: all allowed keys
    rebuild:      R, released tokens rebuilt per step at most (adore only)
    rebuild_mode: "every" (the paper: the R best released tokens every step) or
                  "promote" (only released tokens whose score beats the weakest cached one)
    promote_margin: how far (in controller logits) a released token must beat the weakest cached one
                  to be promoted; damps churn when the scores move a little from step to step
    protect_recent: adore: the last N positions are never released (the controller picks the rest)
    sink_tokens:  first tokens always kept by `sink` (StreamingLLM)
    stride:       spacing of the long-range tokens kept by `strided`
    recent_frac:  share of the budget reserved for the most recent tokens by `h2o` and `strided`
    """

    cache_size: int | None = 192
    top_k: int | None = 96
    rebuild: int = 8
    rebuild_mode: str = "promote"
    promote_margin: float = 0.25  # bench/results/promote_margin.json: 4.6 -> 0.6 rebuilds a step, same ppl
    protect_recent: int = 0
    sink_tokens: int = 4
    stride: int = 16
    recent_frac: float = 0.5

    def __post_init__(self) -> None:
        if self.cache_size is not None and self.cache_size < 1:
            raise UserError(f"cache size must be >= 1, got {self.cache_size}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top-k must be >= 1 (or none), got {self.top_k}")
        if self.rebuild < 0:
            raise UserError(f"rebuild must be >= 0, got {self.rebuild}")
        if self.rebuild_mode not in ("every", "promote"):
            raise UserError(f"rebuild mode must be 'every' or 'promote', got {self.rebuild_mode!r}")
        if self.promote_margin < 0:
            raise UserError(f"promote margin must be >= 0, got {self.promote_margin}")
        if self.protect_recent < 0 or (self.cache_size is not None and self.protect_recent >= self.cache_size):
            raise UserError(f"protect_recent must be >= 0 and below the cache size, got {self.protect_recent}")
        if self.sink_tokens < 0 or self.stride < 1 or not 0.0 <= self.recent_frac <= 1.0:
            raise UserError("sink_tokens >= 0, stride >= 1 and 0 <= recent_frac <= 1 are required")


@dataclass
class SamplingParams:
    """How one request decodes. temperature 0 is greedy.

    forced_tokens: teacher forcing (perplexity): the engine feeds these tokens instead of sampling and
    records each one's log-probability; generation ends when they run out.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None: the tokenizer's EOS
    ignore_eos: bool = False
    forced_tokens: list[int] | None = None

    def __post_init__(self) -> None:
        if self.forced_tokens is not None:
            self.max_tokens = len(self.forced_tokens)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise UserError(f"max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= MAX_TEMPERATURE):
            raise UserError(f"temperature must be in [0, {MAX_TEMPERATURE}], got {self.temperature!r}")
        if self.temperature < GREEDY_BELOW_TEMPERATURE:
            self.temperature = 0.0
        if not (isinstance(self.top_p, (int, float)) and math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and SEED_MIN <= self.seed <= SEED_MAX):
            raise UserError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
