"""A private Ray + Serve for the HTTP tests: one instance per test module, its own temp dir and a
free port, shut down (never `ray stop`) when the module is done."""

from __future__ import annotations

import shutil
import socket
import tempfile
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def private_serve(num_cpus: int, prefix: str):
    """Yield the base URL of a fresh Serve HTTP proxy on a private Ray instance."""
    import ray
    from ray import serve

    tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    port = free_port()
    ray.init(num_cpus=num_cpus, _temp_dir=tmp, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
