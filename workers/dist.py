"""Process-group plumbing for the tensor-parallel ranks: rendezvous, DeepSpeed AutoTP, teardown.

Rank 0's actor picks a free TCP port on its node; every rank joins a torch.distributed group through
that address (gloo on CPU, NCCL on GPUs), then DeepSpeed AutoTP splits the model's Linear layers by
heads across the group. Facts from these machines (DESIGN.md): DeepSpeed's CPU shared-memory
all-reduce segfaults unless LOCAL_SIZE is set, so we switch it off and all-reduce over gloo; every
actor sees its one device as local rank 0.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (unit use)
        return "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, device: str) -> None:
    """Environment a rank needs before torch/DeepSpeed look at it."""
    os.environ["LOCAL_RANK"] = "0"  # each actor sees exactly one device (or CPU)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    os.environ.setdefault("LOCAL_SIZE", str(world))
    if not device.startswith("cuda"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_group(rank: int, world: int, addr: str, port: int, device: str, timeout_s: float) -> None:
    """Join the process group at tcp://addr:port (blocks until all `world` ranks have joined)."""
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def shard_model(model, tp: int):
    """DeepSpeed AutoTP over the existing process group; returns the sharded module.

    replace_with_kernel_inject=False keeps the model's own modules (only Linear layers are swapped for
    sharded ones), which is what adore/attention.py runs."""
    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # gloo all-reduce, no shm kernel
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    dtype = next(model.parameters()).dtype
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp}, dtype=dtype,
                                      replace_with_kernel_inject=False)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the unsliced weights are gone: give their memory back for the KV cache
    return engine.module


def destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
