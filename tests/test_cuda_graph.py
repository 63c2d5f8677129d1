"""The decode step replayed from CUDA graphs equals the eager step (issue 17, part 8).

Runs where a CUDA GPU exists (on the device machine: `python -m pytest tests/test_cuda_graph.py`);
skipped elsewhere. For every policy, with and without top-K, on an MHA and a GQA model in fp32 (TF32
off): the same greedy tokens and per-token log-probabilities within 1e-4, sequences joining and
leaving mid-run (continuous batching changes the active row count between replays), promote mode
changing the captured row count from step to step.
"""

from __future__ import annotations

import pytest
import torch

from adore import AdoreConfig, SamplingParams
from adore.engine import Engine
from adore.models import load_model
from adore.policies import make_policy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")

PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 40, 9, 25, 1)]
CASES = [("full", {}), ("window", {}), ("sink", {}), ("h2o", {}), ("strided", {}),
         ("adore", {"rebuild_mode": "every"}), ("adore", {"rebuild_mode": "promote"}),
         ("adore", {"rebuild_mode": "promote", "top_k": None}), ("adore-norebuild", {})]


@pytest.fixture(scope="module", params=["random:tiny", "random:tiny-gqa"])
def model_on_gpu(request):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return load_model(request.param, device="cuda")


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
                                                 for n, kw in CASES])
def test_graphed_step_equals_eager_step(model_on_gpu, name, kw):
    model, tok, _ = model_on_gpu
    cfg = AdoreConfig(cache_size=16, top_k=kw.get("top_k", 8), rebuild=3,
                      rebuild_mode=kw.get("rebuild_mode", "promote"))
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    runs = {}
    for graphed in (False, True):
        eng = Engine(model, tok, make_policy(name, cfg), max_batch=4, max_seq_len=256, cuda_graphs=graphed)
        assert (eng.graphed is not None) == graphed
        runs[graphed] = eng.generate(PROMPTS, params)  # 6 prompts on 4 rows: rows join and leave
        if graphed:
            assert eng.graphed.graphs, "no graph was captured"
    for eager, graph in zip(runs[False], runs[True]):
        assert graph.token_ids == eager.token_ids
        assert torch.allclose(torch.tensor(graph.logprobs), torch.tensor(eager.logprobs), atol=1e-4)
