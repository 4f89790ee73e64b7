"""AsyncClient: an aiohttp client for any OpenAI-compatible server (fastserve, vLLM, OpenAI).

Bounded concurrency (one semaphore), retries with exponential backoff and full jitter on
connection errors, timeouts, 429 and 5xx (never on other 4xx: the request itself is wrong),
per-request timeouts, streaming, and batch helpers (`map_chat` / `map_complete`) that return
results in input order with per-request errors captured. Imports neither torch nor the engine.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

# 429 and 5xx are the server's state, worth another try; any other 4xx is the request's fault.
_RETRY_STATUSES = frozenset({429}) | frozenset(range(500, 600))


class APIError(Exception):
    """A non-2xx answer. `status` is the HTTP status; `body` the decoded error JSON if any."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.body = body


class StreamError(Exception):
    """The server reported an error inside an event stream (after the 200 was sent)."""


@dataclass
class Result:
    """One request's outcome. `text` is the first choice's text (`texts` all of them);
    on failure `error` holds a one-line description and the other fields are empty."""

    text: str | None = None
    texts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    reasoning_content: str | None = None
    usage: dict | None = None
    response: dict | None = None
    error: str | None = None
    latency: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_chat(cls, resp: dict, latency: float) -> Result:
        choices = resp.get("choices") or []
        texts = [(c.get("message") or {}).get("content") or "" for c in choices]
        first = choices[0] if choices else {}
        return cls(
            text=texts[0] if texts else "",
            texts=texts,
            finish_reason=first.get("finish_reason"),
            reasoning_content=(first.get("message") or {}).get("reasoning_content"),
            usage=resp.get("usage"),
            response=resp,
            latency=latency,
        )

    @classmethod
    def from_completion(cls, resp: dict, latency: float) -> Result:
        choices = resp.get("choices") or []
        texts = [c.get("text") or "" for c in choices]
        first = choices[0] if choices else {}
        return cls(
            text=texts[0] if texts else "",
            texts=texts,
            finish_reason=first.get("finish_reason"),
            usage=resp.get("usage"),
            response=resp,
            latency=latency,
        )


def _describe(e: BaseException) -> str:
    if isinstance(e, APIError):
        return str(e)
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class AsyncClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        model: str | None = None,
        max_concurrency: int = 64,
        timeout: float = 600.0,
        max_retries: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        base = base_url.rstrip("/")
        # Accept both http://host:port and http://host:port/v1, as the openai package does.
        self.base_url = base[:-3] if base.endswith("/v1") else base
        self.api_key = api_key
        self.model = model
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None
        self._sem: asyncio.Semaphore | None = None
        self._model_lock: asyncio.Lock | None = None

    async def __aenter__(self) -> AsyncClient:
        connector = aiohttp.TCPConnector(limit=self.max_concurrency)
        self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        self._sem = asyncio.Semaphore(self.max_concurrency)
        self._model_lock = asyncio.Lock()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- transport ---------------------------------------------------------------------

    def _check_open(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("AsyncClient is not open: use `async with AsyncClient(...) as c:`")
        return self._session

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.backoff_max)
            except ValueError:
                pass
        # Full jitter: clients that failed together do not retry together.
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))

    async def _request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        session = self._check_open()
        url = self.base_url + path
        data = None if body is None else json.dumps(body)
        attempt = 0
        while True:
            retry_after = None
            try:
                async with self._sem:
                    async with session.request(
                        method, url, data=data, timeout=aiohttp.ClientTimeout(total=timeout or self.timeout)
                    ) as resp:
                        if resp.status < 400:
                            return await resp.json(content_type=None)
                        err = await _error_from(resp)
                        retry_after = resp.headers.get("Retry-After")
                if err.status not in _RETRY_STATUSES:
                    raise err
                last: BaseException = err
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as e:
                last = e
            if attempt >= self.max_retries:
                raise last
            await asyncio.sleep(self._backoff(attempt, retry_after))
            attempt += 1

    async def _stream(self, path: str, body: dict, timeout: float | None) -> AsyncIterator[dict]:
        """Yields each `data:` JSON object of an event stream. Retries only until the first
        event arrived: after that a retry would repeat text the caller already has."""
        session = self._check_open()
        url = self.base_url + path
        data = json.dumps(body)
        attempt = 0
        while True:
            retry_after = None
            started = False
            try:
                async with self._sem:
                    async with session.post(
                        url, data=data, timeout=aiohttp.ClientTimeout(total=timeout or self.timeout)
                    ) as resp:
                        if resp.status >= 400:
                            err = await _error_from(resp)
                            retry_after = resp.headers.get("Retry-After")
                        else:
                            async for event in _sse_events(resp):
                                started = True
                                yield event
                            return
                if err.status not in _RETRY_STATUSES:
                    raise err
                last: BaseException = err
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as e:
                if started:
                    raise
                last = e
            if attempt >= self.max_retries:
                raise last
            await asyncio.sleep(self._backoff(attempt, retry_after))
            attempt += 1

    # -- API ---------------------------------------------------------------------------

    async def models(self) -> list[str]:
        resp = await self._request("GET", "/v1/models")
        return [m["id"] for m in resp.get("data", [])]

    async def _resolve_model(self, params: dict) -> dict:
        if "model" in params and params["model"] is not None:
            return params
        if self.model is None:
            async with self._model_lock:
                if self.model is None:
                    names = await self.models()
                    if not names:
                        raise APIError(404, "the server lists no models")
                    self.model = names[0]
        return {**params, "model": self.model}

    async def chat_raw(self, messages: list[dict], timeout: float | None = None, **params) -> dict:
        """The full chat.completion JSON."""
        body = await self._resolve_model({**params, "messages": messages})
        return await self._request("POST", "/v1/chat/completions", body, timeout)

    async def complete_raw(self, prompt, timeout: float | None = None, **params) -> dict:
        body = await self._resolve_model({**params, "prompt": prompt})
        return await self._request("POST", "/v1/completions", body, timeout)

    async def chat(self, messages: list[dict], timeout: float | None = None, **params) -> Result:
        t0 = time.monotonic()
        resp = await self.chat_raw(messages, timeout=timeout, **params)
        return Result.from_chat(resp, time.monotonic() - t0)

    async def complete(self, prompt, timeout: float | None = None, **params) -> Result:
        t0 = time.monotonic()
        resp = await self.complete_raw(prompt, timeout=timeout, **params)
        return Result.from_completion(resp, time.monotonic() - t0)

    async def stream_chat_events(
        self, messages: list[dict], timeout: float | None = None, **params
    ) -> AsyncIterator[dict]:
        """Every chunk object of a streamed chat completion."""
        body = await self._resolve_model({**params, "messages": messages, "stream": True})
        async for event in self._stream("/v1/chat/completions", body, timeout):
            yield event

    async def stream_complete_events(self, prompt, timeout: float | None = None, **params) -> AsyncIterator[dict]:
        body = await self._resolve_model({**params, "prompt": prompt, "stream": True})
        async for event in self._stream("/v1/completions", body, timeout):
            yield event

    async def stream_chat(self, messages: list[dict], timeout: float | None = None, **params) -> AsyncIterator[str]:
        """Text deltas of the first choice's content."""
        async for event in self.stream_chat_events(messages, timeout, **params):
            for c in event.get("choices") or []:
                if c.get("index", 0) == 0:
                    text = (c.get("delta") or {}).get("content")
                    if text:
                        yield text

    async def stream_complete(self, prompt, timeout: float | None = None, **params) -> AsyncIterator[str]:
        async for event in self.stream_complete_events(prompt, timeout, **params):
            for c in event.get("choices") or []:
                if c.get("index", 0) == 0 and c.get("text"):
                    yield c["text"]

    # -- batches -----------------------------------------------------------------------

    async def map_chat(self, requests: Iterable, progress: bool = True, **params) -> list[Result]:
        """Chat completions for many requests, concurrently; results in input order. Each
        request is a list of messages or a dict with "messages" and per-request params
        (overriding **params). A failed request gives a Result with `error` set."""

        def call(item):
            if isinstance(item, dict):
                item = dict(item)
                messages = item.pop("messages")
                return self.chat(messages, **{**params, **item})
            return self.chat(item, **params)

        return await self._map(list(requests), call, progress, "chat")

    async def map_complete(self, prompts: Iterable, progress: bool = True, **params) -> list[Result]:
        """Completions for many prompts (strings, or dicts with "prompt" and params)."""

        def call(item):
            if isinstance(item, dict):
                item = dict(item)
                prompt = item.pop("prompt")
                return self.complete(prompt, **{**params, **item})
            return self.complete(item, **params)

        return await self._map(list(prompts), call, progress, "complete")

    async def _map(
        self,
        items: list,
        call: Callable,
        progress: bool,
        desc: str,
        on_result: Callable[[int, Result], None] | None = None,
    ) -> list[Result]:
        results: list[Result | None] = [None] * len(items)
        bar = _Progress(len(items), desc) if progress else None
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(len(items)):
            queue.put_nowait(i)

        async def worker():
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.monotonic()
                try:
                    r = await call(items[i])
                except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
                    r = Result(error=_describe(e), latency=time.monotonic() - t0)
                results[i] = r
                if on_result is not None:
                    on_result(i, r)
                if bar is not None:
                    bar.update(r)

        # Workers pull indices instead of one task per item: memory stays flat for huge batches.
        try:
            await asyncio.gather(*(worker() for _ in range(min(self.max_concurrency, len(items)))))
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]


class _Progress:
    """tqdm bar counting requests, with generated tokens/s and failures in the postfix."""

    def __init__(self, total: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True)
        self.t0 = time.monotonic()
        self.tokens = 0
        self.errors = 0

    def update(self, r: Result) -> None:
        if r.error is not None:
            self.errors += 1
        elif r.usage:
            self.tokens += r.usage.get("completion_tokens") or 0
        rate = self.tokens / max(time.monotonic() - self.t0, 1e-9)
        self.bar.set_postfix({"tok/s": f"{rate:.1f}", "errors": self.errors}, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


async def _error_from(resp: aiohttp.ClientResponse) -> APIError:
    text = await resp.text(errors="replace")
    body: Any = None
    message = text[:500] or resp.reason or "error"
    try:
        body = json.loads(text)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = body["error"].get("message") or message
        elif isinstance(body, dict) and "message" in body:  # vLLM's flat error shape
            message = body["message"]
    except ValueError:
        pass
    return APIError(resp.status, message, body)


async def _sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """Parses `data:` lines of an event stream; stops at [DONE]."""
    data_lines: list[str] = []
    async for raw in resp.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("data:"):
            value = line[5:]
            data_lines.append(value[1:] if value.startswith(" ") else value)
            continue
        if line == "" and data_lines:
            payload = "\n".join(data_lines)
            data_lines = []
            if payload == "[DONE]":
                return
            event = json.loads(payload)
            if isinstance(event, dict) and "error" in event and "choices" not in event:
                err = event["error"]
                raise StreamError(err.get("message") if isinstance(err, dict) else str(err))
            yield event
