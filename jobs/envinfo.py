"""Hardware and package versions of the process that ran a cell (columns of every row)."""

from __future__ import annotations

import os
import platform
import socket
import sys
from functools import cache
from importlib.metadata import PackageNotFoundError, version


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _node_id() -> str | None:
    if "ray" not in sys.modules:
        return None
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


@cache
def _static() -> dict:
    import pyarrow
    import torch
    import transformers

    return {"hostname": socket.gethostname(), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "ray": _version("ray"), "adore": _version("adore-cluster"), "pyarrow": pyarrow.__version__,
            "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def env_columns(device: str) -> dict:
    """Hardware and version columns for a row produced on `device` ("cpu", "cuda", "cuda:1")."""
    import torch

    info = dict(_static())
    info["device"] = device
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        info["device_name"] = info["cpu_model"]
    info["torch_threads"] = torch.get_num_threads()
    info["node_id"] = _node_id()
    return info
