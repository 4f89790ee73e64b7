"""OpenAI-shaped errors: every failure the server answers is an `APIError` turned into
`{"error": {"message", "type", "param", "code"}}` with the matching HTTP status."""

from __future__ import annotations

import re

import msgspec
from aiohttp import web

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
    def __init__(self, message: str, status: int = 400, *, param: str | None = None,
                 code: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> web.Response:
        return web.Response(status=self.status, body=msgspec.json.encode(self.body()),
                            content_type="application/json", headers=headers)


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


def param_from_value_error(message: str, fields: dict[str, str]) -> str | None:
    """The request field a ValueError is about: the earliest known field name in its message.

    `fields` maps the names that may appear in the message (SamplingParams attributes) to the
    request's field names (chat's `logprobs` count is `top_logprobs` on the wire)."""
    best: tuple[int, int, str] | None = None
    for name, wire in fields.items():
        m = re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message)
        if m and (best is None or (m.start(), -len(name)) < best[:2]):
            best = (m.start(), -len(name), wire)
    return best[2] if best else None
