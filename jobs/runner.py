"""Runs one cell in a worker process and turns the outcome into a row.

A CellRunner lives as long as its worker (a Ray actor, or the driver itself with --local) and keeps
the last model it loaded, the BERTScore encoder and full attention's fidelity references, so cells
that share a model pay its load once. Any exception in a cell becomes a row with status "error" and
the error text; the runner stays usable for the next cell.
"""

from __future__ import annotations

import datetime as dt
import gc
import os
import time
import traceback

import torch

from adore.config import AdoreConfig
from adore.models import load_model
from adore.policies import make_policy

from .envinfo import env_columns
from .schema import cell_columns
from .tasks import TASKS

ERROR_CHARS = 4000
FAULT_ENV = "ADORE_EVAL_FAULT"  # tests: "<model>" makes cells of that model crash their worker process
DELAY_ENV = "ADORE_EVAL_CELL_DELAY"  # tests: seconds to sleep in every cell (to kill a job midway)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class CellRunner:
    def __init__(self, sources: dict[str, dict], device: str | None = None) -> None:
        self.sources = sources
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model_key = None
        self.model = self.tok = self.info = None
        self._memo: dict = {}

    # -- what tasks use ---------------------------------------------------------------------------
    def source(self, spec: str) -> dict:
        return self.sources[spec]

    def policy(self, cell: dict):
        opts = cell.get("policy_options") or {}
        cfg = AdoreConfig(cache_size=cell["cache_size"], top_k=cell["top_k"], rebuild=cell["rebuild"],
                          rebuild_mode=cell["rebuild_mode"] or "promote", **opts)
        return make_policy(cell["policy"], cfg)

    def full_policy(self):
        return make_policy("full", AdoreConfig(cache_size=None, top_k=None))

    def memo(self, key, fn):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def bert_scorer(self):
        """The BERTScore encoder on this worker's device (loaded once per process)."""
        from adore.evaluation import bert_scorer

        return bert_scorer(self.device)

    @staticmethod
    def engine_stats(engine) -> dict:
        s = engine.stats
        keys = ("steps", "released", "rebuilt", "peak_cache_tokens", "peak_step_tokens")
        return {k: s.get(k) for k in keys}

    # -- model cache ------------------------------------------------------------------------------
    def load(self, model: str, dtype: str) -> float:
        """Make (model, dtype) the loaded one; returns the seconds spent loading (0 if cached)."""
        if self._model_key == (model, dtype):
            return 0.0
        self.model = self.tok = self.info = None
        self._memo.clear()
        self._model_key = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        t0 = time.perf_counter()
        self.model, self.tok, self.info = load_model(model, dtype=dtype, device=self.device)
        self._model_key = (model, dtype)
        return time.perf_counter() - t0

    # -- one cell ---------------------------------------------------------------------------------
    def run(self, cell: dict) -> dict:
        """The cell's row: configuration, metrics (or the error), hardware and versions."""
        row = {**cell_columns(cell), "started_at": _now()}
        t0 = time.perf_counter()
        try:
            if os.environ.get(FAULT_ENV) and os.environ[FAULT_ENV] == cell["model"]:
                os._exit(3)  # simulate a worker crash (segfault, OOM kill)
            if os.environ.get(DELAY_ENV):
                time.sleep(float(os.environ[DELAY_ENV]))
            row["load_s"] = self.load(cell["model"], cell["dtype"])
            with torch.no_grad():
                row.update(TASKS[cell["task"]](self, cell))
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - every failure becomes a recorded row
            row["status"] = "error"
            row["error"] = (f"{type(e).__name__}: {e}\n" + traceback.format_exc())[-ERROR_CHARS:]
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        row["seconds"] = time.perf_counter() - t0
        row["finished_at"] = _now()
        row.update(env_columns(self.device))
        return row
