"""Answering over HTTP: a JSON body, or Server-Sent Events with OpenAI's framing (an error
after the 200 went out is reported in the stream, as vLLM does)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import msgspec
from aiohttp import web

from .errors import APIError, api_error
from .state import REQUEST

logger = logging.getLogger("fastserve.server")


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status, content_type="application/json")


class SSE:
    """A text/event-stream response sending OpenAI's framing: `data: {json}\\n\\n` per chunk
    and `data: [DONE]\\n\\n` at the end."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def __aenter__(self) -> SSE:
        await self.response.prepare(self.request)
        return self

    async def send(self, obj: Any) -> None:
        await self.response.write(b"data: " + msgspec.json.encode(obj) + b"\n\n")

    async def send_all(self, chunks: list[Any]) -> None:
        for c in chunks:
            await self.send(c)

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            await self.response.write(b"data: [DONE]\n\n")
            await self.response.write_eof()
            return False
        if isinstance(exc, ConnectionError):
            return True  # the client left; the generator's finally already aborted
        if not isinstance(exc, Exception):
            return False  # cancellation: let it unwind
        # The 200 and its headers are gone already: report in the stream, as vLLM does.
        err = api_error(exc, self.request.get(REQUEST))
        if err is None:
            logger.error("error while streaming %s", self.request.path, exc_info=exc)
            err = APIError("internal error while generating; see the server log", 500, code="internal_error")
        with contextlib.suppress(Exception):
            await self.response.write(b"data: " + msgspec.json.encode(err.body()) + b"\n\n")
            await self.response.write(b"data: [DONE]\n\n")
            await self.response.write_eof()
        return True
