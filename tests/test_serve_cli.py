"""`adore serve` end to end: a subprocess starts its own Ray + Serve with 2 replicas of tp=2 (each
replica: two rank actors in one placement group, gloo + DeepSpeed AutoTP), Serve balances requests
over both, every answer equals the engine alone's, and on Ctrl-C everything shuts down cleanly: the
process exits and no Ray process of its instance is left."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")
pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from adore import SamplingParams  # noqa: E402
from adore.engine import Engine  # noqa: E402
from adore.models import load_model  # noqa: E402
from cluster.config import API_TOKEN_ENV, ServeArgs  # noqa: E402

pytestmark = pytest.mark.ray

MODEL_ARGS = ["--model", "random:tiny-gqa", "--policy", "adore", "--cache-size", "12", "--top-k", "6",
              "--rebuild", "2", "--rebuild-mode", "every", "--max-seq-len", "256"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_processes(temp_dir: str) -> list:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or []):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def test_adore_serve_tp2_two_replicas_match_engine_and_stop_cleanly():
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="arc", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != API_TOKEN_ENV}
    cmd = [sys.executable, "-m", "adore.cli", "serve", *MODEL_ARGS, "--tp", "2", "--replicas", "2",
           "--port", str(port), "--max-batch", "4", "--threads", "1", "--num-cpus", "6",
           "--ray-temp-dir", tmp, "--dtype", "float32"]  # as the reference engine below (auto: bfloat16 on AMX)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:  # every replica running
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "adore serve did not come up"
            time.sleep(1)
        assert [m["id"] for m in httpx.get(base + "/v1/models", timeout=60).json()["data"]] == ["random:tiny-gqa:adore"]
        prompt = "Tensor parallel ranks agree"
        req = {"model": "random:tiny-gqa:adore", "prompt": prompt, "max_tokens": 24, "temperature": 0,
               "ignore_eos": True}
        long = {**req, "max_tokens": 200}
        replicas, texts = set(), set()
        for _ in range(5):  # overlapping requests: Serve's router spreads them over both replicas
            with ThreadPoolExecutor(8) as pool:
                rs = list(pool.map(lambda r: httpx.post(base + "/v1/completions", timeout=180, json=r),
                                   [req, req] + [long] * 6))
            assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
            replicas |= {r.headers["x-adore-replica"] for r in rs}
            texts |= {r.json()["choices"][0]["text"] for r in rs[2:]}
            assert len({r.json()["choices"][0]["text"] for r in rs[:2]}) == 1
            if len(replicas) == 2:  # (its queue-length probes can time out on a loaded machine)
                break
        assert len(replicas) == 2
        assert len(texts) == 1  # every replica decodes the same tokens
        r = rs[0]

        cfg = ServeArgs.parse({"model": "random:tiny-gqa", "policies": "adore", "cache_size": 12, "top_k": 6,
                               "rebuild": 2, "rebuild_mode": "every", "max_seq_len": 256, "device": "cpu"})
        model, tok, info = load_model("random:tiny-gqa")
        eng = Engine(model, tok, cfg.engine_spec("adore").make_policy(), info=info, max_batch=4, max_seq_len=256)
        (want,) = eng.generate([tok.encode(prompt, add_special_tokens=True)],
                               SamplingParams(max_tokens=24, ignore_eos=True))
        assert r.json()["choices"][0]["text"] == want.text
        assert r.json()["usage"]["completion_tokens"] == 24
        assert _ray_processes(tmp)  # sanity: the pattern finds the instance's processes

        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode in (0, 130), out
        assert "shutting down" in out
        deadline = time.monotonic() + 30
        while _ray_processes(tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ray_processes(tmp), [p.info["cmdline"][:2] for p in _ray_processes(tmp)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in _ray_processes(tmp):  # only this test's own Ray instance
            p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def test_serve_cli_rejects_bad_args_before_starting_ray():
    r = subprocess.run([sys.executable, "-m", "adore.cli", "serve", "--policy", "nonsense", "--port", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "unknown policy" in r.stderr
