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


def test_graphs_capture_the_tp_all_reduces():
    """The tp decode step's collectives inside the graph (issue 20), on one GPU: an NCCL group of one
    rank, an all-reduce after every o_proj and down_proj as DeepSpeed AutoTP's LinearAllreduce does
    (at world size 1 the sum is the value itself, but each is a real NCCL launch, captured), and the
    scorer's all-reduce between replays. Capture must accept the collectives (NCCL in capture mode:
    the group's work is not enqueued for its watchdog), the graphed engine must give the eager
    engine's tokens, a replay must run none of the hooks' Python, and the group must close after
    capture without hanging (pytorch/pytorch#115388). At one rank NCCL launches no reduction kernel,
    so what the sum does inside a replay needs two GPUs (bench/multi_gpu.py --cuda-graphs on)."""
    import gc
    import socket

    import torch.distributed as dist

    with socket.socket() as s:  # a free port (workers.dist has the same, but workers imports Ray)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model, tok, _ = load_model("random:tiny-gqa", device="cuda")
        calls = {"n": 0}  # hook runs: at eager steps, warm-ups and captures, never at a replay

        def all_reduce(_mod, _inp, out):
            calls["n"] += 1
            dist.all_reduce(out)  # in place, as LinearAllreduce
            return out

        hooks = [m.register_forward_hook(all_reduce) for layer in model.model.layers
                 for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
        cfg = AdoreConfig(cache_size=16, rebuild=3)
        params = SamplingParams(max_tokens=40, ignore_eos=True)
        runs = {}
        for graphed in (False, True):
            eng = Engine(model, tok, make_policy("adore", cfg), max_batch=4, max_seq_len=256, cuda_graphs=graphed)
            assert (eng.graphed is not None) == graphed
            runs[graphed] = eng.generate(PROMPTS, params)
        assert eng.graphed.graphs, "no graph was captured"
        captured = next(iter(eng.graphed.graphs.values())).graph
        torch.cuda.synchronize()
        before = calls["n"]
        captured.replay()
        torch.cuda.synchronize()
        assert calls["n"] == before, "a replay ran Python"
        for eager, graph in zip(runs[False], runs[True]):
            assert graph.token_ids == eager.token_ids
            assert torch.allclose(torch.tensor(graph.logprobs), torch.tensor(eager.logprobs), atol=1e-4)
        del eng
        for h in hooks:
            h.remove()
        gc.collect()
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
