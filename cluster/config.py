"""The Serve application's arguments (`args:` of a Serve config / RayService serveConfigV2).

Values may arrive as YAML strings ("2", "none"); everything is coerced and checked here, once, so a
typo fails the deployment with a clear message instead of inside a replica.

    model                 smollm2-135m | random:<shape> | /path/to/checkpoint
    policies              comma list, one model id per policy: "<model>:<policy>" (e.g. "adore,full")
    tp                    tensor-parallel ranks per replica (one placement group, STRICT_PACK)
    num_replicas          fixed replica count per policy, or
    min_replicas, max_replicas   Serve autoscaling bounds (target: max_batch ongoing per replica)
    max_ongoing_requests  requests Serve sends one replica at a time
    max_batch             sequences decoded together per replica (engine rows)
    max_queue             requests allowed to wait for an engine row per replica; beyond: 503. Serve's
                          router queue per caller holds max_queue + max_ongoing_requests (then 503 too)
    max_seq_len           prompt + generation tokens per sequence
    max_prefill_tokens    prompt tokens prefilled per engine step, in one packed forward (longer prompts
                          are chunked over steps while the running sequences keep decoding); None: by
                          device, 4096 on a GPU, 1024 on a CPU (adore/config.py says why)
    cache_size, top_k, rebuild, ... every AdoreConfig field: the method's knobs (see adore/config.py)
    controller            controller checkpoint (.safetensors); default: the one shipped for the model
    adapter               LoRA adapter directory (`adore finetune`), merged into the weights
    dtype, device         "auto": bfloat16 on cuda and on CPUs with AMX, else float32 (adore.models.
                          auto_dtype; resolved where the app is built); device auto: cuda if the Ray
                          cluster has GPUs (or ADORE_DEVICE=cuda|cpu)
    cpus_per_rank         Ray CPUs reserved per rank; None: what fits (every rank of every policy's
                          replicas on the cluster's CPUs, at most 1 each; see fit_to_cluster)
    threads               torch threads per rank; None: the rank's whole CPUs (at least 1)
    ingress_replicas, retry_after_s
    max_request_bytes     larger request bodies get 413 before they are read
    request_read_timeout_s  a body not received within this long gets 408 (a client that declares more
                          than it sends must not hold a connection forever)
    cuda_graphs           auto (on for one GPU, off under tp: its captured all-reduces are not yet measured
                          on two GPUs), on, off
    stream_interval_s     0: one stream chunk per engine step; > 0: a request's tokens are sent at most
                          this often (the first at once), which many concurrent streams need: each chunk
                          costs the replica's event loop ~0.2 ms, so 256 streams chunked per step can
                          take longer than the step itself
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

from adore.config import AdoreConfig, UserError, knob_values, parse_field
from workers.spec import EngineSpec

API_TOKEN_ENV = "ADORE_API_TOKEN"


@dataclass
class ServeArgs(AdoreConfig):
    """Serving settings; the method's knobs are the AdoreConfig fields this class extends."""

    model: str = "smollm2-135m"
    policies: str = "adore"
    tp: int = 1
    num_replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    max_ongoing_requests: int = 32
    max_batch: int = 16
    max_queue: int = 64
    max_seq_len: int = 4096
    max_prefill_tokens: int | None = None
    controller: str | None = None
    adapter: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    cpus_per_rank: float | None = None
    threads: int | None = None
    ingress_replicas: int = 1
    retry_after_s: float | None = None  # None: estimated from the replica's queue and step time
    stream_interval_s: float = 0.0
    cuda_graphs: str = "auto"
    max_request_bytes: int = 2 * 2**20
    request_read_timeout_s: float = 30.0

    @classmethod
    def parse(cls, args: dict | None) -> ServeArgs:
        args = dict(args or {})
        known = {f.name for f in fields(cls)}
        unknown = set(args) - known
        if unknown:
            raise UserError(f"unknown serve args: {sorted(unknown)}; known: {sorted(known)}")
        by_name = {f.name: f for f in fields(cls)}
        try:  # by each field's type ("int", "float | None", ...): one rule for every setting
            args = {k: parse_field(by_name[k], v) for k, v in args.items()}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"bad serve arg: {e}") from None
        out = cls(**args)
        out.check()
        return out

    def check(self) -> None:
        if not self.policy_list:
            raise UserError("policies: give at least one policy")
        if self.num_replicas is not None and (self.min_replicas is not None or self.max_replicas is not None):
            raise UserError("give num_replicas or min_replicas/max_replicas, not both")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise UserError("min_replicas and max_replicas go together")
        lo, hi = self.replica_bounds
        if not 0 <= lo <= hi or hi < 1:
            raise UserError(f"replica bounds must satisfy 0 <= min <= max, max >= 1; got {lo}..{hi}")
        for k in ("tp", "max_ongoing_requests", "max_batch", "ingress_replicas", "max_request_bytes"):
            if getattr(self, k) < 1:
                raise UserError(f"{k} must be >= 1")
        if self.cpus_per_rank is not None and not self.cpus_per_rank > 0:
            raise UserError(f"cpus_per_rank must be > 0, got {self.cpus_per_rank}")
        if not self.request_read_timeout_s > 0:
            raise UserError("request_read_timeout_s must be > 0")
        if self.max_queue < 0:
            raise UserError("max_queue must be >= 0")
        from adore.policies import policy_names

        for p in self.policy_list:
            if p not in policy_names():
                raise UserError(f"unknown policy {p!r}; known: {', '.join(policy_names())}")
        self.engine_spec(self.policy_list[0])  # validates the method's numbers

    @property
    def policy_list(self) -> list[str]:
        return [p.strip() for p in self.policies.split(",") if p.strip()]

    @property
    def replica_bounds(self) -> tuple[int, int]:
        if self.min_replicas is not None:
            return self.min_replicas, self.max_replicas
        n = 1 if self.num_replicas is None else self.num_replicas
        return n, n

    @property
    def model_name(self) -> str:
        """The model part of the public model ids (a checkpoint directory's base name)."""
        m = self.model.rstrip("/")
        return os.path.basename(m) if os.path.isdir(m) or m.startswith("/") else m

    def model_id(self, policy: str) -> str:
        return f"{self.model_name}:{policy}"

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        env = os.environ.get("ADORE_DEVICE")
        if env:
            return env
        try:
            import ray

            if ray.is_initialized():
                return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except Exception:
            return "cpu"

    def engine_spec(self, policy: str) -> EngineSpec:
        device = self.resolved_device()
        dtype = self.dtype
        if dtype == "auto":
            from adore.models import auto_dtype

            dtype = auto_dtype(device)
        return EngineSpec(model=self.model, policy=policy, **knob_values(self), controller=self.controller,
                          adapter=self.adapter,
                          dtype=dtype, device=device, max_batch=self.max_batch, max_seq_len=self.max_seq_len,
                          max_prefill_tokens=self.max_prefill_tokens, threads=self.threads,
                          cuda_graphs=self.cuda_graphs)

    @property
    def total_ranks(self) -> int:
        """Rank actors of the whole application at its largest (every policy, max replicas, tp)."""
        return len(self.policy_list) * self.replica_bounds[1] * self.tp

    def fit_to_cluster(self, cpus: float, gpus: float = 0.0, strict: bool = True) -> list[str]:
        """Fill in the defaults that depend on the cluster (cpus_per_rank: an equal share of `cpus`
        for every rank, at most 1; threads: the cores each rank may use) and check that every
        replica can be placed.

        Without this a replica that cannot be placed is never scheduled and its requests wait
        (four policies on a 2-CPU machine at 1 CPU a rank: two never ran). What does not fit raises
        UserError (strict: a local cluster, which will not grow) or is returned as warnings (a cluster
        that may autoscale)."""
        n = self.total_ranks
        uses_gpu = self.resolved_device().startswith("cuda")
        problems = []
        if uses_gpu and n > gpus:
            problems.append(f"{n} ranks ({len(self.policy_list)} policies x {self.replica_bounds[1]} replicas "
                            f"x tp {self.tp}) need {n} GPUs; the cluster has {gpus:g}")
        if self.cpus_per_rank is None:
            self.cpus_per_rank = max(0.01, min(1.0, int(cpus / n * 100) / 100))
        if self.cpus_per_rank * n > cpus + 1e-9:
            problems.append(f"{n} ranks ({len(self.policy_list)} policies x {self.replica_bounds[1]} replicas x "
                            f"tp {self.tp}) x cpus_per_rank {self.cpus_per_rank:g} = "
                            f"{self.cpus_per_rank * n:g} CPUs, but the cluster has {cpus:g}: lower "
                            f"cpus_per_rank (or leave it unset: what fits), or serve fewer policies/replicas")
        if self.threads is None and not uses_gpu:
            self.threads = max(1, int(cpus // n))
        if problems and strict:
            raise UserError("; ".join(problems))
        return problems

    def to_dict(self) -> dict:
        return asdict(self)
