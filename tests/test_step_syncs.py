"""A decode step waits for the device once: the transfer that brings its tokens to the host (issue 19,
"no per-row host work in the step").

Runs where a CUDA GPU exists (`python -m pytest tests/test_step_syncs.py` on the device machine);
skipped elsewhere. torch's sync debug mode warns at every operation that makes the host wait for the
device (a device-to-host copy, `nonzero`, `.item()`, a host-to-device copy from pageable memory); a
step of greedy, sampled and forced rows, with releases and re-admissions, must raise exactly one.
"""

from __future__ import annotations

import traceback
import warnings

import pytest
import torch

from adore import AdoreConfig, SamplingParams
from adore.engine import Engine
from adore.models import load_model
from adore.policies import make_policy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="device syncs exist on a CUDA GPU only")


def _syncs(engine: Engine, steps: int) -> list[str]:
    """Run steps; the Python stack (the engine's frames) of every sync they make."""
    found = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "called a synchronizing" in str(message):  # raised at the sync: the stack is its caller's
            frames = [f for f in traceback.extract_stack()[:-1] if "/adore/" in f.filename]
            found.append(" <- ".join(f"{f.filename.split('/adore/')[-1]}:{f.lineno} {f.line}" for f in frames[::-1]))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return found


@pytest.mark.parametrize("name", ["adore", "h2o", "sink"])
def test_decode_step_syncs_once(name):
    model, tok, _ = load_model("random:tiny", device="cuda")
    eng = Engine(model, tok, make_policy(name, AdoreConfig(cache_size=16, rebuild=3)), max_batch=4,
                 max_seq_len=256)
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 40, 9)]  # within the budget and past it
    params = [SamplingParams(max_tokens=60, ignore_eos=True),
              SamplingParams(max_tokens=60, ignore_eos=True, temperature=0.8, top_p=0.9, seed=3),
              SamplingParams(max_tokens=60, ignore_eos=True, forced_tokens=[(7 * i) % 50 for i in range(60)]),
              SamplingParams(max_tokens=60, ignore_eos=True)]
    for p, sp in zip(prompts, params):
        eng.add_request(p, sp)
    for _ in range(30):  # prefills, graph captures, then every row past its budget
        eng.step()
    released = eng.stats["released"]
    steps = 10
    syncs = _syncs(eng, steps)
    assert eng.n_active == 4 and eng.stats["released"] > released  # the measured steps did release
    assert len(syncs) == steps, "\n".join(syncs)
    assert all("_choose" in s for s in syncs), "\n".join(syncs)  # the one transfer of the tokens
