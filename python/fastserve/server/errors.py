"""OpenAI-shaped errors: every failure the server answers is an `APIError` turned into
`{"error": {"message", "type", "param", "code"}}` with the matching HTTP status.

`api_error` is the one mapping from what the layers raise to that answer:
- `APIError`: a server-side rule, its `param` already the wire name;
- `InvalidRequest` (fastserve.errors): 400, `param` the wire name of its offline `field`
  (the request struct's `wire_name`: chat's `logprobs` count is `top_logprobs`);
- any other `ValueError` (the Rust core's, until its errors carry the field): 400, no param;
- `RequestError`: 500 for that request alone; `EngineDeadError`: 503;
- anything else: 500 without details (logged by the caller)."""

from __future__ import annotations

import re

import msgspec
from aiohttp import web

from fastserve.errors import EngineDeadError, InvalidRequest, RequestError

# OpenAI's `type` per status; clients (the openai package) map the status, not the type,
# to an exception class, so these only need to be recognisable.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> web.Response:
        return web.Response(
            status=self.status, body=msgspec.json.encode(self.body()), content_type="application/json", headers=headers
        )


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, 400, param=param)


_AT = re.compile(r" - at `\$(?P<path>[^`]*)`")
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`")


def from_validation_error(err: msgspec.ValidationError) -> APIError:
    """msgspec says e.g. "Expected `int`, got `str` - at `$.max_tokens`"; the param is the
    JSON path without the leading `$.` ("messages[0].role")."""
    text = str(err)
    path = ""
    m = _AT.search(text)
    if m:
        path = m.group("path").lstrip(".")
    missing = _MISSING.search(text)
    if missing:
        path = f"{path}.{missing.group('field')}" if path else missing.group("field")
    message = _AT.sub("", text)
    if path:
        message = f"{message} (field `{path}`)"
    return APIError(message, 400, param=path or None)


def api_error(exc: BaseException, req=None) -> APIError | None:
    """The answer for `exc` raised while serving `req` (the decoded request struct, when it
    got that far); None for an exception that is not the client's nor a known engine state
    (the caller logs it and answers a bare 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, msgspec.ValidationError):
        return from_validation_error(exc)
    if isinstance(exc, InvalidRequest):
        field = exc.field
        if field is not None and req is not None and hasattr(req, "wire_name"):
            field = req.wire_name(field)
        return APIError(exc.message, 400, param=field)
    if isinstance(exc, ValueError):
        return APIError(str(exc), 400)
    if isinstance(exc, RequestError):
        return APIError(
            "processing this request failed inside the engine (see the server log); "
            "the server keeps serving other requests",
            500,
            code="request_failed",
        )
    if isinstance(exc, EngineDeadError):
        return APIError(
            "the engine stopped after an internal error (see the server log); restart the server",
            503,
            code="engine_dead",
        )
    return None
