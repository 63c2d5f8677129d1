"""The OpenAI-compatible API on a real Ray Serve (one private Ray instance for the module).

random:tiny (byte tokenizer) with policies adore and full, tp=1, a bearer token: responses match the
engine alone; streaming streams; 16 concurrent streams complete correctly in shared batches; bad
input gets OpenAI-style 4xx bodies; overload gets 503 + Retry-After; a disconnect frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")

from serving import private_serve  # noqa: E402

from adore import SamplingParams  # noqa: E402
from adore.engine import Engine  # noqa: E402
from adore.models import load_model  # noqa: E402
from cluster.config import API_TOKEN_ENV, ServeArgs  # noqa: E402

pytestmark = pytest.mark.ray

TOKEN = "test-token-123"
ARGS = {"model": "random:tiny", "policies": "adore,full", "tp": 1, "num_replicas": 1, "max_batch": 16,
        "max_queue": 4, "max_ongoing_requests": 40, "max_seq_len": 4096, "cache_size": 16, "top_k": 8,
        "rebuild": 2, "rebuild_mode": "every", "threads": 1, "device": "cpu",
        "dtype": "float32"}  # the reference below runs float32 (auto would be bfloat16 on a CPU with AMX)
ADORE, FULL = "random:tiny:adore", "random:tiny:full"
CTX = ARGS["max_seq_len"]  # tokens; the byte tokenizer makes one per character
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server():
    from ray import serve

    from cluster.app import build_app

    old = os.environ.get(API_TOKEN_ENV)
    os.environ[API_TOKEN_ENV] = TOKEN  # Ray's processes inherit the driver's environment
    try:
        with private_serve(4, "ars") as base:
            serve.run(build_app(ARGS), name="adore", route_prefix="/")
            yield base
    finally:
        if old is None:
            os.environ.pop(API_TOKEN_ENV, None)
        else:
            os.environ[API_TOKEN_ENV] = old


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    """The engine alone, built like the replicas: greedy text for (policy, ids, max_tokens)."""
    cfg = ServeArgs.parse(ARGS)
    model, tok, info = load_model(ARGS["model"])
    engines = {p: Engine(model, tok, cfg.engine_spec(p).make_policy(), info=info, max_batch=16,
                         max_seq_len=cfg.max_seq_len) for p in ("adore", "full")}

    def run(policy: str, prompts: list[list[int]], max_tokens: int):
        return engines[policy].generate(prompts, SamplingParams(max_tokens=max_tokens))

    run.tok = tok
    return run


def sse_events(lines) -> list:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def replica_stats(client, model: str) -> dict:
    text = client.get("/metrics").text
    out = {}
    for name in ("running_sequences", "waiting_sequences", "engine_steps_total", "engine_decode_tokens_total",
                 "tokens_released_total", "batch_size_peak"):
        m = re.search(rf'^adore_{name}{{model="{re.escape(model)}"}} ([0-9.e+]+)$', text, re.M)
        out[name] = float(m.group(1)) if m else None
    return out


# -- basics ----------------------------------------------------------------------------------------
def test_models_health_and_auth(server, client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == [ADORE, FULL]
    for path in ("/-/healthz", "/health"):
        assert httpx.get(server + path).status_code == 200  # no token needed
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = httpx.post(server + "/v1/completions", json={"model": ADORE, "prompt": "hi"}, headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server + "/v1/models").status_code == 401


@pytest.mark.parametrize("model", [ADORE, FULL])
def test_completion_matches_engine_alone(client, reference, model):
    prompt = "Once upon a time, in a land far away"
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 40,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = reference.tok.encode(prompt, add_special_tokens=True)
    (want,) = reference(model.rsplit(":", 1)[1], [ids], 40)
    assert body["object"] == "text_completion" and body["model"] == model
    assert body["choices"][0]["text"] == want.text
    assert body["choices"][0]["finish_reason"] == want.finish_reason
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(want.token_ids),
                             "total_tokens": len(ids) + len(want.token_ids)}


def test_chat_goes_through_the_chat_template(client, reference):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    r = client.post("/v1/chat/completions", json={"model": ADORE, "messages": msgs, "max_tokens": 12,
                                                  "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    text = reference.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = reference.tok.encode(text, add_special_tokens=False)
    (want,) = reference("adore", [ids], 12)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_seeded_sampling_is_reproducible(client):
    req = {"model": ADORE, "prompt": "abc", "max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 42}
    a, b = (client.post("/v1/completions", json=req).json() for _ in range(2))
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_stop_strings(client, reference):
    ids = reference.tok.encode("Stop here", add_special_tokens=True)
    (full,) = reference("full", [ids], 30)
    stops = [ch for ch in full.text if ch.isascii() and ch.isprintable()]
    if not stops:
        pytest.skip("the random model's text has no printable character to stop at")
    r = client.post("/v1/completions", json={"model": FULL, "prompt": "Stop here", "max_tokens": 30,
                                             "temperature": 0, "stop": [stops[0], "never-there"]}).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"] == full.text.split(stops[0])[0]


# -- streaming -------------------------------------------------------------------------------------
def test_streaming_really_streams(client):
    req = {"model": FULL, "prompt": "Stream this", "max_tokens": 300, "temperature": 0, "stream": True,
           "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    arrivals, lines = [], []
    with client.stream("POST", "/v1/completions", json=req) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                arrivals.append(time.monotonic() - t0)
                lines.append(line)
    total = arrivals[-1]
    events = sse_events(lines)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert len(chunks) >= 10
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 300  # include_usage: a last chunk with usage
    # the first chunks arrived long before the generation ended
    assert arrivals[0] < 0.5 * total, (arrivals[0], total)
    assert len({round(a, 2) for a in arrivals}) >= 5


def test_chat_streaming_chunks(client):
    req = {"model": ADORE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
           "temperature": 0, "stream": True, "ignore_eos": True}
    with client.stream("POST", "/v1/chat/completions", json=req) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_16_concurrent_streams_share_batches(server, client, reference):
    prompts = [f"Request number {i}: " + "abc" * (i % 4) for i in range(16)]
    before = replica_stats(client, ADORE)

    async def one(c, prompt):
        req = {"model": ADORE, "prompt": prompt, "max_tokens": 48, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}}
        async with c.stream("POST", "/v1/completions", json=req) as r:
            assert r.status_code == 200, (await r.aread()).decode()
            return sse_events([line async for line in r.aiter_lines()])

    async def main():
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=120) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    results = asyncio.run(main())
    want = reference("adore", [reference.tok.encode(p, add_special_tokens=True) for p in prompts], 48)
    for events, w in zip(results, want):
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
        assert text == w.text
        assert events[-2]["usage"]["completion_tokens"] == len(w.token_ids)
    after = replica_stats(client, ADORE)
    steps = after["engine_steps_total"] - before["engine_steps_total"]
    rows = after["engine_decode_tokens_total"] - before["engine_decode_tokens_total"]
    assert rows / steps > 4, (rows, steps)  # mean decode batch: the requests shared steps
    assert after["batch_size_peak"] >= 8
    assert after["running_sequences"] == 0


# -- bad input -------------------------------------------------------------------------------------
C, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
BAD = [
    ("invalid json", C, b'{"model": "x", ', 400, None),
    ("not an object", C, [1, 2], 400, None),
    ("unknown model", C, {"model": "nope", "prompt": "hi"}, 404, "model"),
    ("missing model", C, {"prompt": "hi"}, 400, "model"),
    ("missing prompt", C, {"model": ADORE}, 400, "prompt"),
    ("empty prompt", C, {"model": ADORE, "prompt": ""}, 400, "prompt"),
    ("empty token list", C, {"model": ADORE, "prompt": []}, 400, "prompt"),
    ("token id out of range", C, {"model": ADORE, "prompt": [5, 99999]}, 400, "prompt"),
    ("over-long prompt", C, {"model": ADORE, "prompt": "x" * (CTX + 1), "max_tokens": 4}, 400, "prompt"),
    ("prompt + max_tokens too long", C, {"model": ADORE, "prompt": "x" * (CTX // 2 + 100), "max_tokens": CTX // 2}, 400,
     "max_tokens"),
    ("negative max_tokens", C, {"model": ADORE, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("huge max_tokens", C, {"model": ADORE, "prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens"),
    ("max_tokens as string", C, {"model": ADORE, "prompt": "hi", "max_tokens": "10"}, 400, "max_tokens"),
    ("max_tokens as float", C, {"model": ADORE, "prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ("temperature as string", C, {"model": ADORE, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("negative temperature", C, {"model": ADORE, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("top_p zero", C, {"model": ADORE, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("stream as string", C, {"model": ADORE, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("stop as number", C, {"model": ADORE, "prompt": "hi", "stop": 3}, 400, "stop"),
    ("seed as string", C, {"model": ADORE, "prompt": "hi", "seed": "1"}, 400, "seed"),
    ("n > 1", C, {"model": ADORE, "prompt": "hi", "n": 2}, 400, "n"),
    ("prompt as number", C, {"model": ADORE, "prompt": 5}, 400, "prompt"),
    ("batched prompts", C, {"model": ADORE, "prompt": ["a", "b"]}, 400, "prompt"),
    ("no messages", CHAT, {"model": ADORE, "messages": []}, 400, "messages"),
    ("bad role", CHAT, {"model": ADORE, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("content as number", CHAT, {"model": ADORE, "messages": [{"role": "user", "content": 1}]}, 400,
     "messages"),
    ("empty messages", CHAT, {"model": ADORE, "messages": [{"role": "user", "content": ""}]}, 400,
     "messages"),
    ("chat unknown model", CHAT, {"model": "gpt-4", "messages": MSG}, 404, "model"),
    ("chat negative max_tokens", CHAT, {"model": ADORE, "messages": MSG, "max_tokens": -5}, 400,
     "max_tokens"),
    ("streamed over-long prompt", CHAT, {"model": FULL, "messages": [{"role": "user", "content": "y" * (CTX + 1)}],
                                         "stream": True}, 400, "messages"),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_4xx(client, name, path, body, status, param):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] is not None and err["param"].split(".")[0] == param, err


def test_unknown_route_and_method(client):
    assert client.get("/v1/nothing").status_code == 404
    assert client.get(C).status_code == 405
    assert "error" in client.get("/v1/nothing").json()


# -- overload and disconnects ----------------------------------------------------------------------
def test_overload_gets_503_with_retry_after(server, client):
    """max_batch 16 + max_queue 4 per replica: while 20 long requests hold every row and queue place,
    10 more are refused with 503 + Retry-After; once the holders hang up, the replica is idle again.

    The holders are admitted first (their 200 comes after the replica queued them) and ask for more
    tokens than the replica can make before the probes arrive, so no timing decides the outcome."""
    n_hold, n_probe = 16 + 4, 10

    def req(i: int) -> dict:
        return {"model": FULL, "prompt": f"load {i}", "max_tokens": CTX - 100, "ignore_eos": True,
                "temperature": 0, "stream": True}

    async def hold(c, i, admitted: asyncio.Queue, release: asyncio.Event):
        async with c.stream("POST", C, json=req(i)) as r:
            await admitted.put(r.status_code)
            await release.wait()  # hang up without reading: the driver aborts the row

    async def probe(c, i):
        async with c.stream("POST", C, json=req(i)) as r:
            await r.aread()
            return r.status_code, r.headers.get("retry-after"), r.json() if r.status_code != 200 else None

    async def main():
        admitted, release = asyncio.Queue(), asyncio.Event()
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as c:
            holders = [asyncio.create_task(hold(c, i, admitted, release)) for i in range(n_hold)]
            statuses = [await asyncio.wait_for(admitted.get(), 60) for _ in range(n_hold)]
            try:
                return statuses, await asyncio.wait_for(
                    asyncio.gather(*(probe(c, n_hold + i) for i in range(n_probe))), 60)
            finally:
                release.set()
                await asyncio.gather(*holders)

    statuses, refused = asyncio.run(main())
    assert statuses == [200] * n_hold
    assert len(refused) == n_probe
    for status, retry_after, body in refused:
        assert status == 503, (status, body)
        assert retry_after is not None and int(retry_after) >= 1
        assert body["error"]["code"] == "overloaded" and body["error"]["message"]
    wait_until_idle(client, FULL)


def wait_until_idle(client, model: str, timeout_s: float = 10.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        s = replica_stats(client, model)
        if s["running_sequences"] == 0 and s["waiting_sequences"] == 0:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"{model} still busy after {timeout_s}s: {replica_stats(client, model)}")


@pytest.mark.parametrize("path", [C, CHAT])
def test_disconnect_frees_the_slot(server, client, path):
    body = {"model": ADORE, "max_tokens": 1000, "ignore_eos": True, "temperature": 0, "stream": True}
    body.update({"prompt": "never mind"} if path == C else {"messages": MSG})
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
        with c.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not next(lines):  # the first chunk
                pass
            s = replica_stats(client, ADORE)  # still connected: the sequence holds a row
            assert s["running_sequences"] == 1, s
            steps0 = s["engine_steps_total"]
        # leaving the block closes the connection (httpx also closes it when the iterator is dropped)
    # the engine row must be free within a few steps, long before 1000 tokens could have been made
    assert wait_until_idle(client, ADORE, timeout_s=5.0) < 5.0
    assert replica_stats(client, ADORE)["engine_steps_total"] - steps0 < 500


def test_openai_sdk(server):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=server + "/v1", api_key=TOKEN)
    assert [m.id for m in c.models.list()] == [ADORE, FULL]
    r = c.completions.create(model=ADORE, prompt="Hello", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and 0 < r.usage.completion_tokens <= 5
    parts = list(c.chat.completions.create(model=FULL, messages=MSG, max_tokens=6, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}))
    assert parts[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=ADORE, prompt="x", max_tokens=-1)
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_metrics(client):
    r = client.post("/v1/completions", json={"model": ADORE, "prompt": "count me", "max_tokens": 24,
                                             "temperature": 0, "stream": True, "ignore_eos": True})
    assert r.status_code == 200
    text = client.get("/metrics").text
    for name in ("adore_requests_total", "adore_generation_tokens_total",
                 "adore_generation_tokens_per_second",
                 "adore_time_to_first_token_seconds_bucket", "adore_running_sequences",
                 "adore_waiting_sequences", "adore_tokens_released_total", "adore_tokens_rebuilt_total"):
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    s = replica_stats(client, ADORE)
    assert s["tokens_released_total"] > 0
    m = re.search(rf'^adore_time_to_first_token_seconds_count{{model="{ADORE}"}} ([0-9.]+)', text, re.M)
    assert float(m.group(1)) >= 1
    assert re.search(r'^adore_requests_total\{.*status="200"\} [1-9]', text, re.M)
