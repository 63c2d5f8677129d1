"""The evaluation grid: a configuration (preset or YAML) expanded into cells.

A configuration names axes (models, policies, cache budgets, rebuild R, rebuild modes, generation
lengths, batch sizes) and tasks (throughput, ppl, fidelity) with their parameters. A task's section
may override any axis, e.g. `tasks: {throughput: {cache_sizes: [192]}}`. Each task expands over the
axes that matter to it (generation length and batch size only for throughput), and axes that do not
apply to a policy collapse: full attention has no budget, only ADORE policies take top-K, R and a
rebuild mode. Cells that end up identical are kept once.

A cell is a flat dict of its full configuration; its id is a hash of that dict, so the same cell in a
re-submitted job has the same id (which is what resume relies on).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
from pathlib import Path

import yaml

from adore.config import AdoreConfig, UserError, knob_names, parse_knob
from adore.policies import make_policy, policy_names

PRESET_DIR = Path(__file__).parent / "presets"
AXES = ("models", "policies", "cache_sizes", "rebuilds", "rebuild_modes", "gen_lengths", "batch_sizes")
TASKS = ("throughput", "ppl", "fidelity", "retrieval")
TASK_DEFAULTS: dict[str, dict] = {
    "throughput": {"prompt_tokens": 128},
    "ppl": {"tokens": 2048, "offset": 0},
    "fidelity": {"prompts": 16, "prompt_tokens": 256, "new_tokens": 128, "batch": 8},
    "retrieval": {"kinds": ["passkey", "niah_single", "niah_multikey", "variable_track"],
                  "lengths": [256, 512, 1024, 2048], "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "per_cell": 2,
                  "batch": 8},
}
LIST_PARAMS = ("kinds", "lengths", "depths")  # task parameters that are lists (checked one by one)
DEFAULTS: dict = {
    "name": "custom",
    "models": ["smollm2-135m"],
    "dtype": "float32",
    "policies": ["full", "window", "strided", "sink", "h2o", "adore"],
    "cache_sizes": [192],
    # the method's defaults (AdoreConfig); top_k: an integer, null (dense), or a fraction of the budget
    # (0.5: K = m/2)
    "top_k": AdoreConfig().top_k,
    "rebuilds": [AdoreConfig().rebuild],
    "rebuild_modes": [AdoreConfig().rebuild_mode],
    "gen_lengths": [256],
    "batch_sizes": [1],
    # any AdoreConfig knob but the axes; a cell records those its policy reads (Policy.knobs)
    "policy_options": {"sink_tokens": 4, "stride": 16, "recent_frac": 0.5},
    "data": "austen:northangerabbey",
    "tasks": {"throughput": {}, "ppl": {}, "fidelity": {}},
    "resources": {"cpus_per_cell": 1, "gpus_per_cell": "auto", "workers": None},
    "seed": 0,
}
DTYPES = ("float32", "bfloat16", "float16")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(preset: str | None = None, path: str | None = None, overrides: dict | None = None) -> dict:
    """The validated configuration of a preset name or a YAML file (defaults filled in)."""
    if preset and path:
        raise UserError("give --preset or --config, not both")
    if path:
        if not os.path.isfile(path):
            raise UserError(f"config file not found: {path}")
        raw = yaml.safe_load(Path(path).read_text()) or {}
    else:
        name = preset or "smoke"
        file = PRESET_DIR / f"{name}.yaml"
        if not file.is_file():
            raise UserError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
        raw = yaml.safe_load(file.read_text()) or {}
    if not isinstance(raw, dict):
        raise UserError("a config file must hold a YAML mapping")
    for k, v in (overrides or {}).items():
        if v is not None:
            raw[k] = {**(raw.get(k) or {}), **v} if isinstance(v, dict) else v
    return validate(raw)


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _expand_env(s):
    if not isinstance(s, str):
        return s
    out = os.path.expandvars(s)
    if "$" in out:
        raise UserError(f"{s!r} names an environment variable that is not set (or pass --models)")
    return out


def _positive(name: str, values, allow_none: bool = False) -> None:
    for v in values:
        if v is None and allow_none:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{name} must hold positive integers, got {v!r}")


def validate(raw: dict) -> dict:
    """Fill defaults, check names and numbers; raises UserError on the first mistake."""
    unknown = set(raw) - set(DEFAULTS)
    if unknown:
        raise UserError(f"unknown config keys: {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}")
    cfg = copy.deepcopy(DEFAULTS)
    for k, v in raw.items():
        cfg[k] = {**cfg[k], **(v or {})} if k in ("policy_options", "resources") else v
    for ax in AXES:
        cfg[ax] = _as_list(cfg[ax])
    cfg["models"] = [_expand_env(m) for m in cfg["models"]]
    tasks = cfg["tasks"]
    if isinstance(tasks, (list, tuple)):
        tasks = {t: {} for t in tasks}
    if not isinstance(tasks, dict) or not tasks:
        raise UserError("tasks must name at least one of: " + ", ".join(TASKS))
    cfg["tasks"] = {}
    for t, params in tasks.items():
        if t not in TASKS:
            raise UserError(f"unknown task {t!r}; known: {', '.join(TASKS)}")
        params = dict(params or {})
        bad = set(params) - set(TASK_DEFAULTS[t]) - set(AXES) - {"data"}
        if bad:
            raise UserError(f"unknown {t} parameters: {', '.join(sorted(bad))}")
        for ax in AXES:
            if ax in params:
                params[ax] = _as_list(params[ax])
        cfg["tasks"][t] = {**TASK_DEFAULTS[t], **params}
    if cfg["dtype"] not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg['dtype']!r}")
    for t in [cfg, *cfg["tasks"].values()]:
        for p in t.get("policies", []):
            if p not in policy_names():
                raise UserError(f"unknown policy {p!r}; known: {', '.join(policy_names())}")
        for m in t.get("rebuild_modes", []):
            if m not in ("every", "promote"):
                raise UserError(f"rebuild mode must be 'every' or 'promote', got {m!r}")
        _positive("cache_sizes", t.get("cache_sizes", []))
        _positive("gen_lengths", t.get("gen_lengths", []))
        _positive("batch_sizes", t.get("batch_sizes", []))
        for r in t.get("rebuilds", []):
            if not isinstance(r, int) or r < 0:
                raise UserError(f"rebuilds must hold integers >= 0, got {r!r}")
    k = cfg["top_k"]
    if not (k is None or (isinstance(k, float) and 0 < k < 1)):
        _positive("top_k", [k])
    for t, params in cfg["tasks"].items():
        _positive(f"{t} parameters", [v for k, v in params.items()
                                      if k in TASK_DEFAULTS[t] and k not in ("offset", *LIST_PARAMS)])
        if t == "retrieval":
            _check_retrieval(params)
        if not isinstance(params.get("offset", 0), int) or params.get("offset", 0) < 0:
            raise UserError(f"{t} offset must be an integer >= 0")
    axes = ("cache_size", "top_k", "rebuild", "rebuild_mode")  # the grid's own axes and key
    opts = cfg["policy_options"]
    bad = set(opts) - set(knob_names()) | set(opts) & set(axes)
    if bad:
        raise UserError(f"unknown policy_options: {', '.join(sorted(bad))}; known: "
                        f"{', '.join(k for k in knob_names() if k not in axes)}")
    cfg["policy_options"] = {k: parse_knob(k, v) for k, v in opts.items()}
    AdoreConfig(**cfg["policy_options"])  # checks the numbers
    if not cfg["models"] or not cfg["policies"]:
        raise UserError("models and policies must not be empty")
    return cfg


def _check_retrieval(params: dict) -> None:
    from adore.retrieval import TASKS as KINDS

    for k in LIST_PARAMS:
        params[k] = _as_list(params[k])
    if not params["kinds"] or set(params["kinds"]) - set(KINDS):
        raise UserError(f"retrieval kinds must be some of {', '.join(KINDS)}, got {params['kinds']!r}")
    _positive("retrieval lengths", params["lengths"])
    if not params["depths"] or not all(isinstance(d, (int, float)) and 0 <= d <= 1 for d in params["depths"]):
        raise UserError(f"retrieval depths must be numbers in [0, 1], got {params['depths']!r}")


def policy_axes(policy: str, cache_size: int, top_k, rebuild: int, mode: str, options: dict) -> dict:
    """The policy's own view of the knobs: what does not apply becomes None (or 0 for R), and
    `policy_options` keeps only the options the policy reads (its class's `knobs`).
    A fractional top_k (0 < K < 1) is that share of the budget m."""
    if isinstance(top_k, float):
        top_k = max(1, round(top_k * cache_size))
    pol = make_policy(policy, AdoreConfig(cache_size=cache_size, top_k=top_k, rebuild=rebuild,
                                          rebuild_mode=mode, **options))
    d = pol.describe()
    return {"policy": policy, "cache_size": d["cache_size"], "top_k": d["top_k"], "rebuild": d["rebuild"],
            "rebuild_mode": mode if "rebuild_mode" in pol.knobs and d["rebuild"] > 0 else None,
            "policy_options": {k: v for k, v in options.items() if k in pol.knobs}}


def expand(cfg: dict, data_sha: dict[str, str] | None = None) -> list[dict]:
    """All cells of the grid, in a stable order (task, model, policy, ...), duplicates removed."""
    cells: dict[str, dict] = {}
    for task, params in cfg["tasks"].items():
        ax = {a: params.get(a, cfg[a]) for a in AXES}
        if task != "throughput":
            ax["gen_lengths"], ax["batch_sizes"] = [None], [None]
        data = params.get("data", cfg["data"])
        task_params = {k: v for k, v in params.items() if k in TASK_DEFAULTS[task]}
        for model, policy, m, r, mode, gl, bs in itertools.product(*(ax[a] for a in AXES)):
            cell = {"task": task, "model": model, "dtype": cfg["dtype"],
                    **policy_axes(policy, m, cfg["top_k"], r, mode, cfg["policy_options"]),
                    "gen_len": gl, "batch": bs, "params": task_params, "data": data,
                    "data_sha": (data_sha or {}).get(data), "seed": cfg["seed"]}
            cells.setdefault(cell_id(cell), cell)
    return [{"cell_id": cid, **c} for cid, c in cells.items()]


def cell_id(cell: dict) -> str:
    """Stable 16-hex id of a cell's configuration (its `cell_id` key, if present, is ignored)."""
    body = {k: v for k, v in cell.items() if k != "cell_id"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def describe_cell(cell: dict) -> str:
    """One line for logs: `ppl smollm2-135m adore m=64 K=32 R=4 promote`."""
    parts = [cell["task"], cell["model"], cell["policy"]]
    if cell["cache_size"] is not None:
        parts.append(f"m={cell['cache_size']}")
    if cell["top_k"] is not None:
        parts.append(f"K={cell['top_k']}")
    if cell["rebuild"]:
        parts.append(f"R={cell['rebuild']} {cell['rebuild_mode']}")
    if cell["gen_len"] is not None:
        parts.append(f"len={cell['gen_len']} batch={cell['batch']}")
    return " ".join(parts)
