"""The HTTP ingress: OpenAI-compatible routes over one model deployment per policy.

    GET  /v1/models                 the model ids ("<model>:<policy>")
    POST /v1/completions            prompt -> text       (stream: true -> SSE, ends with data: [DONE])
    POST /v1/chat/completions       messages -> message  (through the model's chat template)
    GET  /-/healthz, /health        liveness (Serve's proxy also answers /-/healthz itself)
    GET  /metrics                   Prometheus text (cluster/metrics.py)

The body is parsed and validated here (invalid JSON, wrong types, unknown model, bad numbers -> 400 /
404); prompt length checks need the tokenizer and happen in the model replica, which answers with an
error event before any token, so a streaming request still gets a proper status code. A replica that
is full answers 503 + Retry-After; so does Serve's router when its own queue is full.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotations of
# the class-based routes (string annotations turn them into required query parameters).
import asyncio
import hmac
import json
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError

from . import schemas
from .config import API_TOKEN_ENV, ServeArgs
from .errors import ApiError, bad_request, from_validation, overloaded
from .metrics import ApiMetrics

app = FastAPI(title="ADORE", docs_url=None, redoc_url=None)
log = logging.getLogger("ray.serve")


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


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return body


def _server_error(exc: Exception) -> ApiError:
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    if isinstance(exc, (ActorDiedError, ActorUnavailableError)):
        return ApiError(503, "the model replica is unavailable; retry later", code="unavailable",
                        retry_after_s=5)
    log.error("request failed: %r", exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error")


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
    @app.get("/health")
    async def health(self):
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
            body = await _json_body(request)
            try:
                req = (schemas.ChatCompletionRequest if kind == "chat" else schemas.CompletionRequest
                       ).model_validate(body)
            except ValidationError as e:
                raise from_validation(e.errors()) from None
            model, handle = self._handle(req.model)
            payload = self._payload(kind, req)
            stream = handle.options(stream=True).generate.remote(payload)
            try:
                first = await stream.__anext__()
            except BackPressureError:
                raise overloaded("server overloaded: too many queued requests; retry later",
                                 self.cfg.retry_after_s or 1.0) from None
            if first["event"] == "error":
                raise ApiError.from_event(first)
        except ApiError as e:
            self.metrics.requests.labels(model, endpoint, str(e.status)).inc()
            return e.response()
        except Exception as e:  # a replica died or failed: not the client's fault
            e = _server_error(e)
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
            e = e if isinstance(e, ApiError) else _server_error(e)
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
            err = _server_error(e)
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
