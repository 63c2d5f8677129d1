"""Configuration dataclasses: the method's knobs and a request's sampling parameters."""

from __future__ import annotations

import math
from dataclasses import Field, dataclass, field, fields

# Temperatures below this decode greedily: dividing logits by a smaller number overflows float32
# (1e-50 is 0 in float32, and x / 0 gives inf and NaN probabilities). vLLM draws the same line.
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 2.0  # OpenAI's bound
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a signed 64-bit seed (torch takes [-2^63, 2^64))
# Prompt tokens one engine step prefills at most, in one packed forward (Engine.max_prefill_tokens, and
# the same setting of the CLI, EngineSpec and ServeArgs; None: by device, `prefill_tokens_for`): a longer
# burst of prompts, or a longer prompt, is chunked over steps while the running rows keep decoding.
# On a GPU 4,096 (an H200's burst of 512 x 32 tokens: every first token within 0.74 s,
# bench/results/gpu_latency_h200_batched_place.json). A CPU prefills ~1,000 tokens a second (SmolLM2,
# two cores), so 4,096 would stall every running stream for seconds and hand a burst's first tokens
# out all at once at the end. A burst of 32 x 94 tokens (float32, `python bench/gpu_latency.py --device cpu
# --model smollm2-135m --methods full,adore --scenarios burst --burst 32 --burst-len 94 --gen 16
# --max-prefill-tokens N`, bench/results/gpu_latency_cpu_burst_prefillN.json): median / last first token
# at 4,096: 3.9 / 3.9 s (full), 3.2 / 3.2 s (adore); 1,024: 2.0 / 3.0, 2.2 / 3.3; 512: 2.0 / 3.4, 2.2 / 3.8.
MAX_PREFILL_TOKENS = 4096
MAX_PREFILL_TOKENS_CPU = 1024


def prefill_tokens_for(device, max_prefill_tokens: int | None) -> int:
    """The prompt tokens an engine step prefills on `device`: the setting, or by device when None."""
    if max_prefill_tokens is not None:
        return max_prefill_tokens
    return MAX_PREFILL_TOKENS if str(device).startswith("cuda") else MAX_PREFILL_TOKENS_CPU


class UserError(ValueError):
    """A mistake in what the user asked for (unknown model, bad number, missing file).

    The CLI prints these as one line and exits with code 2; the server maps them to HTTP 400."""


def knob(default, help: str, **meta):
    """A field of AdoreConfig: its help text (and `choices`, `none_aliases`) travel in the metadata,
    from which the CLI flags, the Serve args and the worker spec are derived (see `parse_field`)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class AdoreConfig:
    """Budget and method parameters shared by every KV policy: one field per knob.

    Each policy reads the knobs its class lists in `knobs` (adore/policies/). A new knob is a field
    here (type, default, help) plus the policy that reads it: `adore` CLI flags, Serve args, the worker
    spec (workers/spec.py), job grid `policy_options` and bench/quality.py specs all come from
    `dataclasses.fields(AdoreConfig)`.
    """

    cache_size: int | None = knob(192, "KV budget m: entries kept per sequence between steps "
                                  "(none: unbounded, full attention)")
    top_k: int | None = knob(None, "adore: keys each query row keeps per head after scoring (none or 0: all)",
                             none_aliases=(0,))
    # R = 8 against 32 (bench/results/ppl_spans_{emma,na}_cpu_*.json): Emma (tuned on) 1.062x vs 1.058x
    # full, Northanger Abbey 1.053x vs 1.053x, with 7 re-admissions a step instead of 19 (each copies a
    # token's K/V of every layer twice): on an H200 7,239 vs 5,436 tokens/s (gpu_throughput_h200_v5_r8.json)
    rebuild: int = knob(8, "adore: released tokens rebuilt per step at most, R")
    rebuild_mode: str = knob("promote", "adore: 'every' (the R best released tokens every step, the "
                             "paper) or 'promote' (only released tokens that beat the weakest cached one)",
                             choices=("promote", "every"))
    # bench/results/promote_margin.json: 4.6 -> 0.6 rebuilds a step, same ppl
    promote_margin: float = knob(0.25, "adore promote: how far (controller logits) a released token must "
                                 "beat the weakest cached one; damps churn between near-tied tokens")
    protect_recent: int = knob(0, "adore: the last N positions are never released (the controller "
                               "picks the rest)")
    protect_sinks: int = knob(0, "adore: the first N positions are never released (attention sinks, "
                              "which StreamingLLM keeps; the controller picks the rest)")
    scorer: str = knob("attention", "adore: what scores past tokens: 'attention' (the attention the current "
                       "token gives every cached and stored token, decayed over steps), 'learned' (the v2 "
                       "controller: an MLP over that attention at several decays and the distance, trained "
                       "on future attention; shipped per model) or 'controller' (the paper's GRU over token "
                       "embeddings and positions)", choices=("attention", "learned", "controller"))
    scorer_path: str | None = knob(None, "adore scorer 'learned': a trained scorer file (`python -m "
                                   "adore.train.scorer --out ...`) instead of the one shipped for the model "
                                   "(none: the shipped one)")
    score_decay: float = knob(0.5, "adore scorer 'attention': weight of the past steps' attention in a token's "
                              "score (0: the last step only)")
    score_layers: int | None = knob(None, "adore scorers 'attention', 'learned': how many layers' queries score the "
                                    "tokens, evenly spaced from the first layer to the last (none or 0: all)",
                                    none_aliases=(0,))
    # 'max' against 'mean' (bench/results/retrieval_prompt_cut_cpu*.json, SmolLM2, m=192, 40 prompts a
    # length): retrieval at 256 / 512 / 1,024 / 2,048 tokens 0.73 / 0.69 / 0.61 / 0.52 against 0.73 / 0.68 /
    # 0.61 / 0.44 (full attention: 0.74 / 0.72 / 0.63 / 0.56); no task worse. Streamed perplexity never cuts
    # a prompt (one-token prompts), so it is unchanged.
    prompt_cut: str = knob("max", "adore scorers 'attention', 'learned': what ranks a prompt longer than the "
                           "budget at its cut: 'max' (the largest attention its last position gives each "
                           "position over layers and heads: a needle that one head reads stays) or 'mean' "
                           "(averaged over layers and heads, as every step ranks)", choices=("mean", "max"))
    rebuild_source: str = knob("stored", "adore: where a rebuilt token's K/V comes from: 'stored' (the K/V "
                               "kept when it was released, exact) or 'recompute' (run it through the layers "
                               "again, the paper)", choices=("stored", "recompute"))
    store_size: int = knob(512, "adore rebuild_source 'stored': released tokens whose K/V each sequence "
                           "keeps (the second tier; the lowest-scored go first when it is full)")
    sink_tokens: int = knob(4, "sink, adore-nocontroller: first tokens always kept (StreamingLLM)")
    stride: int = knob(16, "strided: spacing of the long-range tokens kept")
    recent_frac: float = knob(0.5, "h2o, strided: share of the budget reserved for the most recent tokens")

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
        if self.protect_sinks < 0 or (self.cache_size is not None
                                      and self.protect_sinks + self.protect_recent >= self.cache_size):
            raise UserError(f"protect_sinks must be >= 0 and, with protect_recent, below the cache size, "
                            f"got {self.protect_sinks}")
        if self.scorer not in ("attention", "learned", "controller"):
            raise UserError(f"scorer must be 'attention', 'learned' or 'controller', got {self.scorer!r}")
        if self.scorer_path is not None and self.scorer != "learned":
            raise UserError(f"scorer_path is read by scorer 'learned' only (scorer is {self.scorer!r})")
        if not 0.0 <= self.score_decay < 1.0:
            raise UserError(f"score_decay must be in [0, 1), got {self.score_decay}")
        if self.score_layers is not None and self.score_layers < 1:
            raise UserError(f"score_layers must be >= 1 (or none), got {self.score_layers}")
        if self.prompt_cut not in ("mean", "max"):
            raise UserError(f"prompt_cut must be 'mean' or 'max', got {self.prompt_cut!r}")
        if self.rebuild_source not in ("stored", "recompute"):
            raise UserError(f"rebuild_source must be 'stored' or 'recompute', got {self.rebuild_source!r}")
        if self.store_size < 0:
            raise UserError(f"store_size must be >= 0, got {self.store_size}")
        if self.sink_tokens < 0 or self.stride < 1 or not 0.0 <= self.recent_frac <= 1.0:
            raise UserError("sink_tokens >= 0, stride >= 1 and 0 <= recent_frac <= 1 are required")

    def adore_config(self) -> AdoreConfig:
        """The knobs alone, as a plain AdoreConfig (for the classes that extend this one with settings
        of their own: workers.spec.EngineSpec, cluster.config.ServeArgs)."""
        return AdoreConfig(**knob_values(self))


def knob_names() -> list[str]:
    return [f.name for f in fields(AdoreConfig)]


def knob_values(obj) -> dict:
    """{knob: value} read from any object that has the knobs as attributes (an argparse namespace,
    an EngineSpec, ServeArgs)."""
    return {k: getattr(obj, k) for k in knob_names()}


_NONE_WORDS = ("none", "null", "off", "")
_TYPES = {"int": int, "float": float, "str": str}


def parse_field(f: Field, value):
    """A value for dataclass field f from a string or a loosely typed one (YAML, argparse, `k=v`
    specs), by the field's annotation: "int", "float", "str", "bool" or "<one of them> | None".
    Optional fields take none/null/off/"" (and the field's `none_aliases`) as None.
    Raises ValueError/TypeError on a value that is not of the type."""
    kind, optional = (f.type if isinstance(f.type, str) else f.type.__name__), False
    if kind.endswith(" | None"):
        kind, optional = kind[: -len(" | None")], True
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
    if kind == "bool":
        if isinstance(value, str):
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[value.lower()]
        return bool(value)
    if kind not in _TYPES:
        raise TypeError(f"{f.name}: no parser for type {kind!r}")
    out = _TYPES[kind](value)
    if optional and out in f.metadata.get("none_aliases", ()):
        return None
    return out


def parse_knob(name: str, value):
    """A knob's value from a string or loosely typed value; UserError names the knob."""
    f = {f.name: f for f in fields(AdoreConfig)}.get(name)
    if f is None:
        raise UserError(f"unknown method option {name!r}; known: {', '.join(knob_names())}")
    try:
        return parse_field(f, value)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"bad value for {name}: {value!r}") from None


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
