"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with the right HTTP status.

Every mistake in a request becomes an ApiError (4xx) before it reaches an engine; overload is 503
with Retry-After. Nothing a client sends may produce a 5xx or a hang.
"""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "server_overloaded", 500: "server_error"}


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


def from_validation(errors: list[dict]) -> ApiError:
    """pydantic / FastAPI validation errors -> one 400 naming the first bad field."""
    e = errors[0] if errors else {}
    loc = [str(x) for x in e.get("loc", ()) if x not in ("body",)]
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid request")
    return bad_request(f"{param}: {msg}" if param else msg, param=param, code="invalid_value")
