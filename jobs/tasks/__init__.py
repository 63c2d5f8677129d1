"""What one cell measures. Each task is `run(ctx, cell) -> dict of metric columns` (jobs/schema.py);
`ctx` is the worker's runner (model, tokenizer, ModelInfo, device, sources, memoized references)."""

from __future__ import annotations

from . import fidelity, ppl, retrieval, throughput

TASKS = {"throughput": throughput.run, "ppl": ppl.run, "fidelity": fidelity.run, "retrieval": retrieval.run}
