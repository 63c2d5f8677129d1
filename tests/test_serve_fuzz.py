"""No request may take a replica down (issue 16): the HTTP API on a real Ray Serve, fed the bad
requests that once did (a tiny temperature, a huge seed, lone surrogates, deep nesting, a huge body,
a body that never arrives, non-neutral chat options) and a few hundred generated malformed bodies.

For every one: no 5xx, every 4xx carries an OpenAI error body, and a well-formed request right
after it succeeds (the replica and its engine loop are still there).
"""

from __future__ import annotations

import json
import socket
import time

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from serving import private_serve  # noqa: E402

pytestmark = pytest.mark.ray

MODEL = "random:tiny:adore"
LIMIT = 64 * 1024
READ_TIMEOUT_S = 2.0
ARGS = {"model": "random:tiny", "policies": "adore", "num_replicas": 1, "max_batch": 8, "max_queue": 8,
        "max_ongoing_requests": 16, "max_seq_len": 1024, "cache_size": 16, "top_k": 8, "rebuild": 2,
        "threads": 1, "device": "cpu", "max_request_bytes": LIMIT, "request_read_timeout_s": READ_TIMEOUT_S}
GOOD = {"model": MODEL, "prompt": "hello", "max_tokens": 2, "temperature": 0}
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server():
    from ray import serve

    from cluster.app import build_app

    with private_serve(2, "arf") as base:
        serve.run(build_app(ARGS), name="adore", route_prefix="/")
        yield base


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def check_error_body(r: httpx.Response) -> dict:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text[:500]
        return err
    return {}


def assert_still_serving(client) -> None:
    r = client.post("/v1/completions", json=GOOD)
    assert r.status_code == 200, r.text[:500]
    assert r.json()["usage"]["completion_tokens"] == 2


def post_raw(client, path: str, raw: bytes) -> httpx.Response:
    return client.post(path, content=raw, headers={"Content-Type": "application/json"})


# -- the cases that once took a replica down or got a 500 ------------------------------------------
C, CHAT = "/v1/completions", "/v1/chat/completions"
OK_CASES = [  # bad-looking but valid: served, and the engine stays up
    ("tiny temperature", C, {**GOOD, "temperature": 1e-50}),
    ("denormal temperature", C, {**GOOD, "temperature": 5e-324}),
    ("tiny temperature chat", CHAT, {"model": MODEL, "messages": MSG, "max_tokens": 2, "temperature": 1e-45}),
    ("smallest seed", C, {**GOOD, "temperature": 1.0, "seed": -(2**63)}),
    ("largest seed", C, {**GOOD, "temperature": 1.0, "seed": 2**63 - 1}),
    ("neutral chat options", CHAT, {"model": MODEL, "messages": MSG, "max_tokens": 2, "logprobs": False,
                                    "response_format": {"type": "text"}, "tool_choice": "none", "tools": []}),
]
BAD_CASES = [  # (name, path, body or raw bytes, status, param)
    ("seed 2^64", C, {**GOOD, "temperature": 1.0, "seed": 2**64}, 400, "seed"),
    ("seed below -2^63", C, {**GOOD, "temperature": 1.0, "seed": -(2**63) - 1}, 400, "seed"),
    ("huge seed greedy", C, {**GOOD, "seed": 10**30}, 400, "seed"),
    ("temperature NaN", C, b'{"model": "%s", "prompt": "hi", "temperature": NaN}' % MODEL.encode(), 400,
     "temperature"),
    ("temperature Infinity", C, b'{"model": "%s", "prompt": "hi", "temperature": Infinity}' % MODEL.encode(),
     400, "temperature"),
    ("top_p NaN", C, b'{"model": "%s", "prompt": "hi", "top_p": NaN}' % MODEL.encode(), 400, "top_p"),
    ("temperature 3", C, {**GOOD, "temperature": 3}, 400, "temperature"),
    ("lone surrogate prompt", C, b'{"model": "%s", "prompt": "\\ud800"}' % MODEL.encode(), 400, "prompt"),
    ("lone surrogate chat", CHAT,
     b'{"model": "%s", "messages": [{"role": "user", "content": "a\\udfffb"}]}' % MODEL.encode(), 400,
     "messages"),
    ("lone surrogate stop", C, b'{"model": "%s", "prompt": "x", "stop": ["\\ud83d"]}' % MODEL.encode(), 400,
     "stop"),
    ("nested 1000 deep", C, b'{"model": "m", "prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, None),
    ("nested 50 000 deep", C, b"[" * 50_000, 400, None),
    ("nested 40 deep", CHAT, b'{"x": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}", 400, None),
    ("huge token id", C, {**GOOD, "prompt": [1, 2**70]}, 400, "prompt"),
    ("token id past the vocab", C, {**GOOD, "prompt": [1, 2**31 - 1]}, 400, "prompt"),
    ("long stop string", C, {**GOOD, "stop": "s" * 10_000}, 400, "stop"),
    ("chat logprobs", CHAT, {"model": MODEL, "messages": MSG, "logprobs": True}, 400, "logprobs"),
    ("chat top_logprobs", CHAT, {"model": MODEL, "messages": MSG, "top_logprobs": 3}, 400, "top_logprobs"),
    ("chat response_format", CHAT, {"model": MODEL, "messages": MSG, "response_format": {"type": "json_object"}},
     400, "response_format"),
    ("chat tool_choice", CHAT, {"model": MODEL, "messages": MSG, "tool_choice": "auto"}, 400, "tool_choice"),
    ("chat functions", CHAT, {"model": MODEL, "messages": MSG, "functions": [{"name": "f"}]}, 400, "functions"),
    ("chat tools", CHAT, {"model": MODEL, "messages": MSG, "tools": [{"type": "function"}]}, 400, "tools"),
    ("completion logprobs", C, {**GOOD, "logprobs": 5}, 400, "logprobs"),
    ("body not utf-8", C, b'{"model": "\xff\xfe"}', 400, None),
]


@pytest.mark.parametrize("name,path,body", OK_CASES, ids=[c[0] for c in OK_CASES])
def test_odd_but_valid_requests_are_served(client, name, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text[:500]
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert_still_serving(client)


@pytest.mark.parametrize("name,path,body,status,param", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_requests_get_a_4xx_and_the_replica_stays(client, name, path, body, status, param):
    r = post_raw(client, path, body) if isinstance(body, bytes) else client.post(path, json=body)
    err = check_error_body(r)
    assert r.status_code == status, r.text[:500]
    if param is not None:
        assert err["param"] == param, err
    assert_still_serving(client)


def test_a_body_over_the_limit_gets_413_at_once(client):
    t0 = time.monotonic()
    r = client.post(C, json={**GOOD, "prompt": "x" * (5 * 2**20)})  # 5 MB: refused from Content-Length
    assert r.status_code == 413 and check_error_body(r)["code"] == "request_too_large"
    assert time.monotonic() - t0 < 5

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "%s", "prompt": "' % MODEL.encode()
        for _ in range(LIMIT // 1024 + 2):
            yield b"y" * 1024
        yield b'"}'

    r = client.post(C, content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert_still_serving(client)


def test_a_body_that_never_arrives_gets_408(server, client):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": ")
        t0 = time.monotonic()
        reply = s.recv(65536).decode(errors="replace")
        waited = time.monotonic() - t0
        while "\r\n\r\n" not in reply or not reply.rstrip().endswith("}"):  # the body may come apart
            more = s.recv(65536).decode(errors="replace")
            if not more:
                break
            reply += more
    assert reply.startswith("HTTP/1.1 408"), reply[:300]
    assert '"code":"request_timeout"' in reply.replace(" ", "")
    assert READ_TIMEOUT_S - 0.5 < waited < READ_TIMEOUT_S + 10
    assert_still_serving(client)


def test_a_long_prompt_being_tokenised_does_not_stall_other_streams(client):
    """Tokenising runs off the replica's event loop: a stream in progress keeps its pace while a
    near-limit prompt is read, tokenised and refused."""
    import threading

    gaps, stop = [], threading.Event()

    def stream():
        last = time.monotonic()
        body = {**GOOD, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with client.stream("POST", C, json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now
                if stop.is_set():
                    break

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.5)
    for _ in range(3):
        r = client.post(C, json={**GOOD, "prompt": "word " * (LIMIT // 5 - 40)})
        assert r.status_code == 400 and check_error_body(r)["code"] == "context_length_exceeded"
    stop.set()
    t.join(60)
    assert len(gaps) > 5 and max(gaps[1:]) < 5.0, gaps


# -- generated malformed requests ------------------------------------------------------------------
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "stop", "seed", "stream", "stream_options", "n", "user", "presence_penalty", "frequency_penalty",
          "logit_bias", "ignore_eos", "echo", "suffix", "logprobs", "best_of", "top_logprobs",
          "response_format", "tools", "tool_choice", "functions", "function_call"]
ODD = st.sampled_from([0, -1, 1e-300, 1e308, -(2**63), 2**64, "", "\x00", [], {}, None, True, [[[]]],
                       {"role": "user"}, "x" * 600, [{"role": "user", "content": [{"type": "image_url"}]}],
                       [{"role": "user", "content": None}], [-1], [2**40]])
body_strategy = st.one_of(
    st.fixed_dictionaries({"model": st.sampled_from([MODEL, "nope", "random:tiny"])},
                          optional={f: st.one_of(json_value, ODD) for f in FIELDS}),
    json_value,
)
raw_strategy = st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(path=st.sampled_from([C, CHAT]), body=body_strategy)
def test_generated_malformed_json_bodies(client, path, body):
    if isinstance(body, dict) and body.get("stream") is True:
        body = {**body, "stream": False}  # a valid stream would only be slow to read here
    if isinstance(body, dict):
        body = {**body, "max_tokens": 2} if "max_tokens" not in body else body
    r = post_raw(client, path, json.dumps(body).encode())
    check_error_body(r)
    assert_still_serving(client)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(path=st.sampled_from([C, CHAT, "/v1/models", "/v1/nothing"]), raw=raw_strategy)
def test_generated_malformed_raw_bodies(client, path, raw):
    check_error_body(post_raw(client, path, raw))
    assert_still_serving(client)


def test_metrics_tell_the_truth_during_a_burst(server, client):
    """24 streams at once on 8 engine rows, 8 waiting places and 16 ongoing requests per replica:
    while they run, /metrics shows 8 running and the other 16 waiting (8 in the replica's queue,
    8 still in Serve's router), not the 0/0 of an idle replica's last snapshot."""
    from concurrent.futures import ThreadPoolExecutor

    body = {**GOOD, "max_tokens": 900, "ignore_eos": True, "stream": True}

    import threading

    stop = threading.Event()

    def stream(_):  # reads until told to stop, then disconnects (the engine aborts the request)
        with httpx.Client(base_url=server, timeout=120) as c, c.stream("POST", C, json=body) as r:
            for line in r.iter_lines():
                if stop.is_set() or line == "data: [DONE]":
                    break
            return r.status_code

    def gauges():
        out = {}
        for line in client.get("/metrics").text.splitlines():
            for name in ("running_sequences", "waiting_sequences", "router_queued_requests"):
                if line.startswith(f'adore_{name}{{model="{MODEL}"}} '):
                    out[name] = float(line.split()[-1])
        return out

    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(stream, i) for i in range(24)]
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(f.done() for f in futures):
            seen.append(gauges())
            if seen[-1].get("running_sequences") == 8 and seen[-1].get("waiting_sequences", 0) >= 12:
                break
            time.sleep(0.3)
        stop.set()
        statuses = [f.result() for f in futures]
    assert statuses == [200] * 24, statuses
    assert seen and seen[-1]["running_sequences"] == 8, seen
    assert seen[-1]["waiting_sequences"] >= 12 and seen[-1]["router_queued_requests"] >= 4, seen
    assert_still_serving(client)


def test_metrics_after_the_fuzz(client):
    text = client.get("/metrics").text
    totals = [x for x in text.splitlines() if x.startswith("adore_requests_total{")]
    assert any('status="200"' in x and 'model="random:tiny:adore"' in x for x in totals), totals
    assert any('status="400"' in x for x in totals), totals
    assert not [x for x in totals if 'status="5' in x], totals

