"""The HTTP ingress: OpenAI-compatible routes over one model deployment per policy.

    GET  /v1/models                 the model ids ("<model>:<policy>")
    POST /v1/completions            prompt -> text       (stream: true -> SSE, ends with data: [DONE])
    POST /v1/chat/completions       messages -> message  (through the model's chat template)
    GET  /-/healthz                 liveness (Serve's proxy also answers it itself)
    GET  /health                    readiness: 503 while a model has no running replica
    GET  /metrics                   Prometheus text (cluster/metrics.py)

The body is read here with a size limit (413) and a read timeout (408), parsed (invalid JSON, nesting
deeper than MAX_JSON_DEPTH, lone UTF-16 surrogates -> 400) and validated (wrong types, unknown model,
numbers out of bounds -> 400 / 404); prompt length checks need the tokenizer and happen in the model
replica, which answers with an error event before any token, so a streaming request still gets a
proper status code. A replica that is full answers 503 + Retry-After; so does Serve's router when its
own queue is full, and so does this ingress when a model has no running replica (checked every
NO_REPLICA_CHECK_S while a request waits to be assigned; two misses in a row), instead of a wait.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotations of
# the class-based routes (string annotations turn them into required query parameters).
import asyncio
import hmac
import json
import logging
import os
import time

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.requests import ClientDisconnect

from . import schemas
from .config import API_TOKEN_ENV, ServeArgs
from .errors import ApiError, bad_request, from_validation, overloaded
from .metrics import ApiMetrics

app = FastAPI(title="ADORE", docs_url=None, redoc_url=None)
log = logging.getLogger("ray.serve")
MAX_JSON_DEPTH = 32  # an OpenAI request nests 5 deep; json.loads itself fails near 1,000
NO_REPLICA_CHECK_S = 1.0
SERVING_STATES = ("RUNNING", "UPDATING", "PENDING_MIGRATION")  # Serve replica states that take requests


@app.exception_handler(ApiError)
async def _api_error(_req, exc: ApiError):
    return exc.response()


@app.exception_handler(RequestValidationError)
async def _validation_error(_req, exc: RequestValidationError):
    return from_validation(list(exc.errors())).response()


@app.exception_handler(404)
async def _not_found(req: Request, _exc):
    return ApiError(404, f"no route {req.method} {req.url.path}", code="not_found").response()


@app.exception_handler(405)
async def _bad_method(req: Request, _exc):
    return ApiError(405, f"method {req.method} not allowed on {req.url.path}").response()


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, at most `limit` bytes (413 before reading when Content-Length says more), all of it
    within `timeout_s` (408: a client that declares more than it sends must not hold the request)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("Content-Length is not a number", code="invalid_request")
        if int(declared) > limit:
            raise ApiError(413, f"the request body ({int(declared)} bytes) is larger than this server's "
                                f"limit of {limit} bytes", code="request_too_large")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    chunks, size = [], 0
    parts = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(parts.__anext__(), max(0.0, deadline - loop.time()))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body was not received within {timeout_s:g} s",
                           code="request_timeout") from None
        except ClientDisconnect:
            raise bad_request("the client disconnected while sending the body", code="client_disconnected") from None
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is larger than this server's limit of {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_json(value) -> None:
    """Depth and text checks over a parsed body, iteratively (no recursion to exhaust): strings must be
    valid Unicode (JSON's \\ud800 escapes can encode lone surrogates, which no tokenizer can read)."""
    stack = [(value, 1, "")]
    while stack:
        v, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad_request(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
        if isinstance(v, dict):
            stack.extend((x, depth + 1, f"{path}.{k}" if path else str(k)) for k, x in v.items())
            texts = list(v)
        elif isinstance(v, list):
            stack.extend((x, depth + 1, f"{path}[{i}]") for i, x in enumerate(v))
            texts = []
        else:
            texts = [v] if isinstance(v, str) else []
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request(f"{path or 'body'}: the text holds a lone UTF-16 surrogate (e.g. \\ud800), "
                                  f"which is not valid Unicode", param=path.split("[")[0].split(".")[0] or None,
                                  code="invalid_text") from None


async def _json_body(request: Request, cfg: ServeArgs) -> dict:
    raw = await _read_body(request, cfg.max_request_bytes, cfg.request_read_timeout_s)
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad_request(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    _check_json(body)
    return body


def _server_error(exc: Exception, retry_after_s: float = 5.0) -> ApiError:
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    if isinstance(exc, (ActorDiedError, ActorUnavailableError)):
        return ApiError(503, "the model replica is unavailable; retry later", code="unavailable",
                        retry_after_s=retry_after_s)
    log.error("request failed: %r", exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error")


def _replica_states(model_id: str) -> dict | None:
    """Replica counts by state ({"RUNNING": 1, "STARTING": 1}) of a model id's deployment, from Serve's
    controller; None when it cannot tell (then the request keeps waiting, as before)."""
    try:
        ctx = serve.get_replica_context()
        dep = f"model-{model_id.rsplit(':', 1)[1]}"
        status = serve.status().applications[ctx.app_name].deployments[dep]
        return {str(getattr(k, "value", k)): n for k, n in status.replica_states.items() if n}
    except Exception:
        return None


def _actor_alive(name: str) -> bool:
    """Whether a replica's Ray actor still exists (a dead one's name is released at once)."""
    from ray.serve._private.constants import SERVE_NAMESPACE

    try:
        ray.get_actor(name, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def _describe(states: dict) -> str:
    return ", ".join(f"{n} {k.lower()}" for k, n in sorted(states.items())) or "no replicas"


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, models: dict, args: dict) -> None:
        self.models = models  # model id -> DeploymentHandle
        self.cfg = ServeArgs.parse(args)
        self.metrics = ApiMetrics()
        self.token = os.environ.get(API_TOKEN_ENV) or None

    # -- plumbing ------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if self.token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, cred = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(cred.strip().encode(), self.token.encode()):
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <token>)",
                           code="invalid_api_key")

    def _handle(self, model: str):
        if model in self.models:
            return model, self.models[model]
        matches = [m for m in self.models if m.rsplit(":", 1)[0] == model]  # bare model name: first policy
        if matches:
            return matches[0], self.models[matches[0]]
        raise ApiError(404, f"the model {model!r} does not exist; available: {', '.join(self.models)}",
                       param="model", code="model_not_found")

    # -- routes --------------------------------------------------------------------------------
    @app.get("/-/healthz")
    async def liveness(self):
        return Response("success", media_type="text/plain")

    @app.get("/health")
    async def health(self):
        """Readiness: 200 when every model has a running replica, else 503 naming what is missing
        (Serve's proxy answers /-/healthz itself: that one says only that HTTP is up)."""
        missing = {}
        for m in self.models:
            states = await asyncio.to_thread(_replica_states, m)
            if states is not None and not any(states.get(k) for k in SERVING_STATES):
                missing[m] = _describe(states)
        if missing:
            return ApiError(503, "no running replica: " + "; ".join(f"{m} ({d})" for m, d in missing.items()),
                            code="unavailable", retry_after_s=max(self._restart_estimate_s(m) for m in missing)
                            ).response()
        return Response("success", media_type="text/plain")

    @app.get("/metrics")
    async def metrics(self):
        async def fetch(h):
            try:
                self.metrics.replica_snapshot(await asyncio.wait_for(h.stats.remote(), 5))
            except Exception:  # a replica starting or gone: report what we know
                pass

        # Serve routes each call to one replica: ask a few times per known replica so that every
        # replica's snapshot is usually fresh (the exact per-replica gauges are Ray's ray_adore_replica_*).
        calls = [fetch(h) for m, h in self.models.items()
                 for _ in range(2 * self.metrics.n_replicas(m) + 1)]
        await asyncio.gather(*calls)
        await asyncio.to_thread(self.metrics.forget_dead, _actor_alive)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(self, request: Request):
        self._auth(request)
        return schemas.model_list(list(self.models))

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, "chat")

    # -- one request ---------------------------------------------------------------------------
    async def _serve(self, request: Request, kind: str):
        t0 = time.monotonic()
        endpoint = "chat" if kind == "chat" else "completions"
        model = "-"
        try:
            self._auth(request)
            req = await self._parse(request, kind)
            model, handle = self._handle(req.model)
            payload = self._payload(kind, req)
            stream = handle.options(stream=True).generate.remote(payload)
            first = await self._first_event(model, stream)
            if first["event"] == "error":
                raise ApiError.from_event(first)
        except ApiError as e:
            self.metrics.requests.labels(model, endpoint, str(e.status)).inc()
            return e.response()
        except Exception as e:  # a replica died or failed: not the client's fault
            e = _server_error(e, self._restart_estimate_s(model))
            self.metrics.requests.labels(model, endpoint, str(e.status)).inc()
            return e.response()
        self.metrics.prompt_tokens.labels(model).inc(first["prompt_tokens"])
        ctx = {"model": model, "kind": kind, "req": req, "t0": t0, "prompt_tokens": first["prompt_tokens"],
               "replica": first.get("replica", ""),
               "id": schemas.new_id("chatcmpl" if kind == "chat" else "cmpl"), "created": int(time.time())}
        if req.stream:
            return StreamingResponse(self._sse_stream(stream, ctx), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              "X-Adore-Replica": first.get("replica", "")})
        return await self._collect(stream, ctx)

    async def _parse(self, request: Request, kind: str):
        """The validated request. Whatever a client sends ends here as an ApiError (4xx), never as
        an exception that would become a 500."""
        body = await _json_body(request, self.cfg)
        try:
            return (schemas.ChatCompletionRequest if kind == "chat" else schemas.CompletionRequest
                    ).model_validate(body)
        except ValidationError as e:
            raise from_validation(e.errors()) from None
        except (RecursionError, ValueError, TypeError) as e:
            raise bad_request(f"invalid request: {type(e).__name__}", code="invalid_request") from None

    async def _first_event(self, model: str, stream) -> dict:
        """Wait for the replica's first event ("start" or "error"). While the request waits in Serve's
        router (every replica busy, or none running), check each NO_REPLICA_CHECK_S that the model
        still has a running replica: if not, 503 + Retry-After now instead of a wait with no end."""
        nxt = asyncio.ensure_future(stream.__anext__())
        strikes = 0
        self.metrics.unassigned[model] = self.metrics.unassigned.get(model, 0) + 1
        try:
            while True:
                done, _ = await asyncio.wait({nxt}, timeout=NO_REPLICA_CHECK_S)
                if done:
                    try:
                        return nxt.result()
                    except BackPressureError:
                        raise overloaded("server overloaded: too many queued requests; retry later",
                                         self.cfg.retry_after_s or 1.0) from None
                state = await asyncio.to_thread(_replica_states, model)
                missing = state is not None and not any(state.get(k) for k in SERVING_STATES)
                strikes = strikes + 1 if missing else 0
                if strikes >= 2:  # twice in a row: not a replica caught between two states
                    nxt.cancel()
                    stream.cancel()
                    raise ApiError(503, f"the model {model!r} has no running replica right now "
                                        f"({_describe(state)}); retry later", code="unavailable",
                                   retry_after_s=self._restart_estimate_s(model))
        finally:
            self.metrics.unassigned[model] -= 1

    def _restart_estimate_s(self, model: str) -> float:
        """Retry-After for a replica being replaced: how long this model's replicas took to start."""
        return self.metrics.restart_s(model)

    def _payload(self, kind: str, req) -> dict:
        mt = req.requested_max_tokens() if kind == "chat" else req.max_tokens
        param = "max_completion_tokens" if kind == "chat" and req.max_completion_tokens is not None \
            else "max_tokens"
        if mt is not None and mt < 0:
            raise bad_request(f"{param}: must be >= 0, got {mt}", param=param, code="invalid_value")
        if mt is not None and mt >= self.cfg.max_seq_len:
            raise bad_request(f"{param}: {mt} is more than this model's context of {self.cfg.max_seq_len} "
                              f"tokens", param=param, code="context_length_exceeded")
        payload = {"kind": kind, "sampling": req.sampling(mt)}
        if kind == "chat":
            payload["messages"] = req.chat_messages()
        else:
            payload["prompt"] = req.prompt_value()
        return payload

    def _observe(self, ctx: dict, ev: dict) -> None:
        n = ev.get("tokens", 0)
        if n and "ttft" not in ctx:
            ctx["ttft"] = time.monotonic() - ctx["t0"]
            self.metrics.ttft.labels(ctx["model"]).observe(ctx["ttft"])
        ctx["completion_tokens"] = ctx.get("completion_tokens", 0) + n
        self.metrics.tokens(ctx["model"], n)
        if ev.get("stats"):
            self.metrics.replica_snapshot(ev["stats"])

    def _done(self, ctx: dict, status: str) -> None:
        endpoint = "chat" if ctx["kind"] == "chat" else "completions"
        self.metrics.requests.labels(ctx["model"], endpoint, status).inc()
        self.metrics.duration.labels(ctx["model"]).observe(time.monotonic() - ctx["t0"])

    def _usage(self, ctx: dict) -> dict:
        return schemas.usage(ctx["prompt_tokens"], ctx.get("completion_tokens", 0))

    async def _collect(self, stream, ctx: dict):
        parts, finish = [], None
        try:
            async for ev in stream:
                if ev["event"] == "error":
                    raise ApiError.from_event(ev)
                self._observe(ctx, ev)
                parts.append(ev["text"])
                finish = ev["finish_reason"] or finish
        except Exception as e:
            e = e if isinstance(e, ApiError) else _server_error(e, self._restart_estimate_s(ctx["model"]))
            self._done(ctx, str(e.status))
            return e.response()
        finally:
            stream.cancel()  # no-op when finished; aborts the engine request if we were cancelled
        self._done(ctx, "200")
        build = schemas.chat if ctx["kind"] == "chat" else schemas.completion
        return JSONResponse(build(ctx["id"], ctx["model"], "".join(parts), finish, self._usage(ctx),
                                  ctx["created"]), headers={"X-Adore-Replica": ctx["replica"]})

    async def _sse_stream(self, stream, ctx: dict):
        rid, model, created, chat = ctx["id"], ctx["model"], ctx["created"], ctx["kind"] == "chat"
        status = "499"  # client closed the connection before the end
        try:
            if chat:
                role = {"role": "assistant", "content": ""}
                yield _sse(schemas.chat_chunk(rid, model, role, None, created))
            async for ev in stream:
                if ev["event"] == "error":
                    yield _sse(ApiError.from_event(ev).body())
                    status = str(ev["status"])
                    break
                self._observe(ctx, ev)
                finish = ev["finish_reason"]
                if ev["text"]:
                    if chat:
                        yield _sse(schemas.chat_chunk(rid, model, {"content": ev["text"]}, None, created))
                    else:
                        yield _sse(schemas.completion_chunk(rid, model, ev["text"], None, created))
                if finish is not None:
                    if chat:
                        yield _sse(schemas.chat_chunk(rid, model, {}, finish, created))
                    else:
                        yield _sse(schemas.completion_chunk(rid, model, "", finish, created))
                    status = "200"
        except Exception as e:  # the replica failed mid-stream: tell the client in-band, then close
            err = _server_error(e, self._restart_estimate_s(ctx["model"]))
            status = str(err.status)
            yield _sse(err.body())
        else:
            if ctx["req"].include_usage and status == "200":
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield _sse(schemas.usage_chunk(rid, model, obj, self._usage(ctx), created))
            yield b"data: [DONE]\n\n"
        finally:
            stream.cancel()  # client gone: Serve cancels the replica's generator -> engine abort
            self._done(ctx, status)
