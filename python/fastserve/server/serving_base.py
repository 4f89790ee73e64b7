"""What completions and chat share: server state, SamplingParams from a request, the length
check, tokenization off the event loop, the engine call with metrics and abort-on-exit, and
Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, AsyncIterator

import msgspec
from aiohttp import web

from ..errors import InvalidRequest, RequestError
from .errors import APIError, api_error, bad_request, from_validation_error
from .metrics import ServerMetrics

logger = logging.getLogger("fastserve.server")

# Prompts longer than this (characters) are encoded in a worker thread: the Rust encoder
# releases the GIL, so the event loop keeps serving other requests meanwhile.
_INLINE_ENCODE_CHARS = 8192


class ServerState:
    """Everything the handlers share. `engine` is None until the background load finishes."""

    def __init__(self, *, served_model_names: list[str], model_path: str, api_key: str | None,
                 chat_template: str | None, reasoning_parser, max_model_len: int | None = None,
                 log_requests: bool = True, tool_call_parser: str | None = None,
                 enable_auto_tool_choice: bool = False) -> None:
        self.engine = None
        self.load_error: BaseException | None = None
        self.draining = False
        self.served_model_names = served_model_names
        self.model_path = model_path
        self.api_key = api_key
        self.chat_template = chat_template
        self.reasoning_parser = reasoning_parser
        # --tool-call-parser (a tool_parsers name) and --enable-auto-tool-choice
        self.tool_call_parser = tool_call_parser
        self.enable_auto_tool_choice = enable_auto_tool_choice
        self.log_requests = log_requests
        self.metrics = ServerMetrics(served_model_names[0])
        self.created = int(time.time())
        self.max_model_len = max_model_len
        # Sampling defaults from the model's generation_config.json (set at engine load).
        self.generation_defaults: dict[str, Any] = {}

    def set_engine(self, engine) -> None:
        self.engine = engine
        self.served_model_names = list(getattr(engine, "served_model_names", None)
                                       or self.served_model_names)
        self.max_model_len = engine.model_config.max_model_len

    def ready_engine(self):
        if self.draining:
            raise APIError("the server is shutting down", 503, code="shutting_down")
        if self.engine is None:
            if self.load_error is not None:
                raise APIError(f"the model failed to load: {self.load_error}", 503,
                               code="model_load_failed")
            raise APIError("the model is still loading; retry when GET /health returns 200",
                           503, code="model_loading")
        if getattr(self.engine, "errored", False):
            raise APIError("the engine stopped after an internal error (see the server log); "
                           "restart the server", 503, code="engine_dead")
        return self.engine

    def check_model(self, name: str | None) -> str:
        if name is None or name in self.served_model_names:
            return self.served_model_names[0] if name is None else name
        raise APIError(f"The model `{name}` does not exist; this server serves "
                       f"{', '.join(self.served_model_names)}", 404, param="model",
                       code="model_not_found")


STATE: web.AppKey[ServerState] = web.AppKey("state", ServerState)
# The decoded request struct, kept on the aiohttp request so that an error raised anywhere
# later is answered with the param named as this request's wire format names it.
REQUEST = "fastserve.request"


def random_id(prefix: str, request_id: str | None = None) -> str:
    """`prefix-<random>`, or `prefix-<request_id>` when the client named it (vLLM's rule)."""
    return f"{prefix}-{request_id if request_id else uuid.uuid4().hex}"


async def read_json(request: web.Request, type_):
    body = await request.read()
    try:
        req = msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        raise from_validation_error(e) from None
    except msgspec.DecodeError as e:
        raise bad_request(f"The request body is not valid JSON ({e}); send a JSON object.") from None
    except UnicodeDecodeError as e:  # msgspec checks strings' UTF-8 only as it decodes them
        raise bad_request(f"The request body is not valid UTF-8 ({e.reason} at byte {e.start}); "
                          "send UTF-8 JSON.") from None
    except RecursionError:
        raise bad_request("The request body nests JSON too deeply; flatten it.") from None
    request[REQUEST] = req
    if hasattr(req, "check"):
        req.check()
    return req


def structured_outputs_spec(req):
    """The request's structured-outputs constraint (response_format, structured_outputs or
    guided_*), or None; a malformed one raises StructuredOutputsError naming its field."""
    from fastserve.structured_outputs.request import structured_outputs_from_request

    return structured_outputs_from_request(**req.structured_output_fields())


# A grammar that takes longer than this to compile is refused (a 400), not waited for.
COMPILE_TIMEOUT_S = 30.0


async def compile_constraint(state: ServerState, spec) -> None:
    """Compiles `spec` in the engine's grammar pool, off the event loop and the step thread,
    so that an invalid schema, regex or grammar is a 400 before anything is queued and the
    engine finds the grammar cached. Engines without a local compiler (data-parallel
    replicas) compile it themselves."""
    if spec is None:
        return
    manager = getattr(state.engine, "structured", None)
    if manager is None:
        return
    try:
        fut = manager.submit(spec)
        # shield: a timed-out wait must not cancel the shared (cached) compile.
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), COMPILE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise InvalidRequest(f"compiling the {spec.kind} constraint took longer than {COMPILE_TIMEOUT_S:.0f} s; "
                          "simplify it", spec.param) from None


def sampling_params(req, *, max_tokens: int, logprobs: int | None, defaults: dict[str, Any] | None = None,
                    structured_outputs=None, prompt_logprobs: int | None = None,
                    skip_special_tokens: bool | None = None):
    """SamplingParams from the request's fields (only those the client set), the fields it
    left unset taken from `defaults` (the model's generation_config.json, see
    fastserve.generation_config), then SamplingParams' own. SamplingParams validates them:
    its InvalidRequest names the field, which the request struct maps to the wire name."""
    from fastserve.sampling_params import SamplingParams

    kw: dict[str, Any] = {"n": req.n, "max_tokens": max_tokens}
    for name in ("best_of", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos",
                 "stop_token_ids", "skip_special_tokens", "spaces_between_special_tokens",
                 "include_stop_str_in_output", "bad_words", "prompt_logprobs", "allowed_token_ids"):
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    if req.stop is not None:
        kw["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
    if req.logit_bias:
        # OpenAI documents [-100, 100]; vLLM's server clamps to it.
        kw["logit_bias"] = {k: min(100.0, max(-100.0, v)) for k, v in req.logit_bias.items()}
    if logprobs is not None:
        kw["logprobs"] = logprobs
    if defaults:
        from fastserve.generation_config import apply_to_request

        kw = apply_to_request(kw, defaults)
    if prompt_logprobs is not None and "prompt_logprobs" not in kw:
        kw["prompt_logprobs"] = prompt_logprobs
    if skip_special_tokens is not None:
        kw["skip_special_tokens"] = skip_special_tokens
    if structured_outputs is not None:
        kw["structured_outputs"] = structured_outputs
    return SamplingParams(**kw)


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int,
                       prompt_field: str, max_tokens_field: str) -> int:
    """vLLM's rule: the prompt must leave room, and prompt + max_tokens may not exceed
    max_model_len (400); no max_tokens means "up to the context length"."""
    if prompt_len >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"{prompt_field} has {prompt_len} tokens. Please shorten it (or set "
            f"truncate_prompt_tokens).", prompt_field)
    if requested is None:
        return max_model_len - prompt_len
    if prompt_len + requested > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the {prompt_field}, "
            f"{requested} in the completion). Please reduce the length of the {prompt_field} "
            f"or {max_tokens_field}.", max_tokens_field)
    return requested


async def encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    if len(text) <= _INLINE_ENCODE_CHARS:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    loop = asyncio.get_running_loop()
    ids = await loop.run_in_executor(None, tokenizer.encode_batch, [text], add_special_tokens)
    return ids[0]


def check_token_ids(ids: list[int], vocab_size: int, field: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"{field} holds token id {bad}, outside the vocabulary "
                          f"[0, {vocab_size})", field)


def truncate(ids: list[int], truncate_prompt_tokens: int | None, max_model_len: int,
             side: str | None = None) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the last tokens ("left" truncation, the default) or
    the first ("right")."""
    if truncate_prompt_tokens is None:
        return ids
    keep = max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
    return ids[:keep] if side == "right" else ids[-keep:]


async def generate(state: ServerState, request_id: str, prompt_ids: list[int], params,
                   prompt: str | None) -> AsyncIterator[Any]:
    """engine.generate with the request's metrics; aborts the request (freeing its KV blocks
    at once) when the consumer goes away before it finished: a client disconnect cancels the
    handler, and the cancellation unwinds through here."""
    engine = state.engine
    m = state.metrics
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
        m.finished(reason, time.monotonic() - start, prompt_tokens=len(prompt_ids),
                   generation_tokens=seen_tokens, params=params,
                   decode_seconds=None if first_at is None else last - first_at)


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


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status,
                        content_type="application/json")


class SSE:
    """A text/event-stream response sending OpenAI's framing: `data: {json}\\n\\n` per chunk
    and `data: [DONE]\\n\\n` at the end."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"})

    async def __aenter__(self) -> "SSE":
        await self.response.prepare(self.request)
        return self

    async def send(self, obj: Any) -> None:
        await self.response.write(b"data: " + msgspec.json.encode(obj) + b"\n\n")

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
            err = APIError("internal error while generating; see the server log", 500,
                           code="internal_error")
        with contextlib.suppress(Exception):
            await self.response.write(b"data: " + msgspec.json.encode(err.body()) + b"\n\n")
            await self.response.write(b"data: [DONE]\n\n")
            await self.response.write_eof()
        return True
