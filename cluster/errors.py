"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with the right HTTP status.

Every mistake in a request becomes an ApiError (4xx) before it reaches an engine; overload is 503
with Retry-After. Nothing a client sends may produce a 5xx or a hang.
"""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "server_overloaded", 500: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def as_event(self) -> dict:
        """How a model replica reports the error to the ingress (over a Serve stream)."""
        return {"event": "error", "status": self.status, "message": self.message, "param": self.param,
                "code": self.code, "retry_after_s": self.retry_after_s}

    @classmethod
    def from_event(cls, ev: dict) -> ApiError:
        return cls(ev["status"], ev["message"], param=ev.get("param"), code=ev.get("code"),
                   retry_after_s=ev.get("retry_after_s"))


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def overloaded(message: str, retry_after_s: float) -> ApiError:
    return ApiError(503, message, code="overloaded", retry_after_s=retry_after_s)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "StrictStr", "StrictInt"}


def _is_tag(x) -> bool:
    """pydantic names the branch of a union it tried in the location ("str", "list[int]", ...)."""
    return isinstance(x, str) and (x in _TYPE_TAGS or "[" in x or "-" in x)


def from_validation(errors: list[dict]) -> ApiError:
    """pydantic / FastAPI validation errors -> one 400 naming the first bad field.

    For a union field (a prompt is a string or a list of token ids) pydantic reports one error per
    branch; the deepest one is the branch the value was meant for (a list's bad element), so that is
    the one reported, under the field's own name."""
    if not errors:
        return bad_request("invalid request", code="invalid_value")
    first_field = next((x for x in errors[0].get("loc", ()) if x != "body"), None)
    same = [e for e in errors if next((x for x in e.get("loc", ()) if x != "body"), None) == first_field]
    e = max(same, key=lambda e: len(e.get("loc", ())))
    loc = [x for x in e.get("loc", ()) if x != "body" and not _is_tag(x)]
    where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")
    param = str(loc[0]) if loc else None
    msg = e.get("msg", "invalid request")
    return bad_request(f"{where}: {msg}" if where else msg, param=param, code="invalid_value")
