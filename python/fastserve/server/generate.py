"""The engine stage: a request's outputs from the EngineClient, with its metrics, aborted
(its KV blocks freed at once) when the consumer goes away before it finished; several
prompts' streams merged as their outputs arrive."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastserve.errors import RequestError

if TYPE_CHECKING:
    from fastserve.engine.client import EngineClient

    from .metrics import ServerMetrics


async def generate(
    engine: EngineClient, metrics: ServerMetrics, request_id: str, prompt_ids: list[int], params, prompt: str | None
) -> AsyncIterator[Any]:
    """engine.generate with the request's metrics; aborts the request (freeing its KV blocks
    at once) when the consumer goes away before it finished: a client disconnect cancels the
    handler, and the cancellation unwinds through here."""
    m = metrics
    start = time.monotonic()
    stream = engine.generate(request_id, prompt_ids, params, prompt=prompt)
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        return
    except (ValueError, RequestError):  # refused before anything ran (api_error maps it): nothing to abort
        raise
    except BaseException:  # cancelled (client gone) before the first token, or engine error
        with contextlib.suppress(Exception):
            await engine.abort(request_id)
        m.finished("abort", time.monotonic() - start)
        raise
    m.prompt_tokens += len(prompt_ids)
    last = first_at = None
    seen_tokens = 0
    finished = False
    reason: str | None = "abort"
    try:
        try:
            async for out in _chain(first, stream):
                now = time.monotonic()
                total = sum(len(o.token_ids) for o in out.outputs)
                if total > seen_tokens:
                    if last is None:
                        m.ttft.observe(now - start)
                        first_at = now
                    else:
                        m.itl.observe(now - last)
                    m.generation_tokens += total - seen_tokens
                    seen_tokens, last = total, now
                if out.finished:
                    finished = True
                    reason = out.outputs[0].finish_reason if out.outputs else None
                yield out
        except RequestError:
            reason = "error"
            raise
    finally:
        if not finished:
            with contextlib.suppress(Exception):
                await engine.abort(request_id)
        with contextlib.suppress(Exception):
            await stream.aclose()
        m.finished(
            reason,
            time.monotonic() - start,
            prompt_tokens=len(prompt_ids),
            generation_tokens=seen_tokens,
            params=params,
            decode_seconds=None if first_at is None else last - first_at,
        )


async def _chain(first, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


async def primed(agen: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """`agen` with its first item already awaited: a request the engine refuses fails here,
    as a proper 400, before a stream's 200 headers go out."""
    try:
        first = await anext(agen)
    except StopAsyncIteration:
        return agen
    return _chain(first, agen)


async def merge(gens: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several generators as their items arrive: (generator index, item)."""
    if len(gens) == 1:
        async with contextlib.aclosing(gens[0]) as g:
            async for item in g:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen: AsyncIterator[Any]) -> None:
        try:
            async with contextlib.aclosing(gen) as g:
                async for item in g:
                    await queue.put((i, item, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, None, e))
            return
        await queue.put((i, done, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, item, err = await queue.get()
            if err is not None:
                raise err
            if item is done:
                remaining -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
