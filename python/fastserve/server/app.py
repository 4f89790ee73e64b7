"""The aiohttp application: routes, middlewares (errors, auth, readiness), the background
engine load, and `serve()` with graceful shutdown on SIGINT/SIGTERM.

The HTTP server starts before the model loads so that orchestrators see a live process whose
/health answers 503 until the engine is ready, as vLLM's does."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import time

import msgspec
from aiohttp import web

import fastserve
from fastserve.errors import EngineDeadError, RequestError

from . import protocol
from .errors import APIError, api_error
from .prompts import check_token_ids, encode, render_messages
from .protocol import read_request
from .serving_chat import create_chat_completion
from .serving_completions import create_completion
from .sse import json_response
from .state import REQUEST, STATE, ServerState

logger = logging.getLogger("fastserve.server")

OPENAPI: web.AppKey[dict] = web.AppKey("openapi", dict)
MAX_BODY: web.AppKey[int] = web.AppKey("max_body", int)

# Routes anyone may call: liveness, metrics scraping and the API description carry no
# model access. Everything else needs the key when one is set.
_OPEN_PATHS = frozenset({"/health", "/version", "/metrics", "/openapi.json", "/ping"})
# Longer id lists are decoded in a worker thread so the event loop keeps serving.
_INLINE_DECODE_TOKENS = 4096


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every failure leaves as an OpenAI error body; a traceback never reaches the client."""
    state: ServerState = request.app[STATE]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except (APIError, ValueError, RequestError, EngineDeadError) as exc:
        e = api_error(exc, request.get(REQUEST))
        status = e.status
        headers = {"Retry-After": "5"} if e.status == 503 else None
        return e.response(headers)
    except web.HTTPRequestEntityTooLarge:
        status = 413
        return APIError(
            f"Request body too large: the limit is {request.app[MAX_BODY]} bytes (--max-request-body-mb).",
            413,
            code="request_too_large",
        ).response()
    except web.HTTPNotFound:
        status = 404
        return APIError(
            f"No route {request.method} {request.path}; see GET /openapi.json", 404, code="not_found"
        ).response()
    except web.HTTPMethodNotAllowed as e:
        status = 405
        return APIError(
            f"{request.method} is not allowed on {request.path} (allowed: {', '.join(sorted(e.allowed_methods))})",
            405,
            code="method_not_allowed",
        ).response()
    except web.HTTPException as e:
        status = e.status
        return APIError(e.reason or "HTTP error", e.status).response()
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # nginx's "client closed request": the client left
        raise
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return APIError("internal server error; see the server log", 500, code="internal_error").response()
    finally:
        state.metrics.count_http(route, status)
        if state.log_requests and route != "/metrics":
            logger.info("%s %s %s", request.method, request.path, status)


@web.middleware
async def auth_middleware(request: web.Request, handler):
    state: ServerState = request.app[STATE]
    if state.api_key is not None and request.path not in _OPEN_PATHS:
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {state.api_key}"
        if not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode()):
            raise APIError("Missing or wrong API key: send `Authorization: Bearer <key>`.", 401, code="invalid_api_key")
    return await handler(request)


async def health(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    state.ready_engine()
    return web.Response(status=200)


async def version(request: web.Request) -> web.Response:
    return json_response({"version": fastserve.__version__})


async def metrics(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    stats = None
    if state.engine is not None:
        with contextlib.suppress(Exception):
            stats = state.engine.stats()
    return web.Response(
        text=state.metrics.render(stats),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


async def list_models(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    state.ready_engine()
    return json_response(
        {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "fastserve",
                    "root": state.model_path,
                    "parent": None,
                    "max_model_len": state.max_model_len,
                }
                for name in state.served_model_names
            ],
        }
    )


async def tokenize(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    req: protocol.TokenizeRequest = await read_request(request, protocol.TokenizeRequest)
    engine = state.ready_engine()
    state.check_model(req.model)
    tok = engine.tokenizer
    if req.messages is not None:
        text = render_messages(
            tok,
            req.messages,
            chat_template=req.chat_template,
            default_template=state.chat_template,
            chat_template_kwargs=req.chat_template_kwargs,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
        )
        add_special = False if req.add_special_tokens is None else req.add_special_tokens
    else:
        text = req.prompt
        add_special = True if req.add_special_tokens is None else req.add_special_tokens

    ids = await encode(tok, text, add_special)
    body = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = [tok.id_to_token(t) for t in ids]
    return json_response(body)


async def detokenize(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    req: protocol.DetokenizeRequest = await read_request(request, protocol.DetokenizeRequest)
    engine = state.ready_engine()
    state.check_model(req.model)

    check_token_ids(req.tokens, engine.model_config.vocab_size, "tokens")
    if len(req.tokens) > _INLINE_DECODE_TOKENS:
        text = await asyncio.get_running_loop().run_in_executor(None, engine.tokenizer.decode, req.tokens)
    else:
        text = engine.tokenizer.decode(req.tokens)
    return json_response({"prompt": text})


def openapi_spec() -> dict:
    """OpenAPI 3.1 document of the routes, with request schemas generated from the msgspec
    structs (the same types that validate requests, so the two cannot drift apart)."""
    bodies = {
        "/v1/completions": protocol.CompletionRequest,
        "/v1/chat/completions": protocol.ChatCompletionRequest,
        "/tokenize": protocol.TokenizeRequest,
        "/detokenize": protocol.DetokenizeRequest,
    }
    types = list(bodies.values())
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    error = {
        "description": "error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    components["ErrorResponse"] = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    }
    errors = {str(s): error for s in (400, 401, 404, 413, 500, 503)}
    paths: dict = {}
    for path, t in bodies.items():
        ok = {"description": "OK", "content": {"application/json": {}}}
        if path.startswith("/v1/"):
            ok["content"]["text/event-stream"] = {}
        paths[path] = {
            "post": {
                "operationId": path.strip("/").replace("/", "_"),
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{t.__name__}"}}},
                },
                "responses": {"200": ok, **errors},
            }
        }
    for path in ("/v1/models", "/health", "/version", "/metrics"):
        paths[path] = {
            "get": {
                "operationId": path.strip("/").replace("/", "_"),
                "responses": {"200": {"description": "OK"}, **errors},
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "fastserve OpenAI-compatible API", "version": fastserve.__version__},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}, {}],
    }


async def openapi(request: web.Request) -> web.Response:
    return json_response(request.app[OPENAPI])


def build_app(state: ServerState, max_body_bytes: int) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=max_body_bytes)
    app[STATE] = state
    app[OPENAPI] = openapi_spec()
    app[MAX_BODY] = max_body_bytes
    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/completions", create_completion)
    app.router.add_post("/v1/chat/completions", create_chat_completion)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    return app


def engine_args_from(args):
    from fastserve.engine.arg_utils import EngineArgs

    return EngineArgs(
        model=args.model,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=getattr(args, "data_parallel_size", 1),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager,
        max_num_sample_rows=getattr(args, "max_num_sample_rows", None),
        seed=args.seed,
        enable_prefix_caching=args.enable_prefix_caching,
        load_format=args.load_format,
        block_size=args.block_size,
        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
        quantization=getattr(args, "quantization", None),
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        device=args.device,
        served_model_name=args.served_model_name,
        trust_remote_code=getattr(args, "trust_remote_code", False),
        revision=getattr(args, "revision", None),
        tokenizer_revision=getattr(args, "tokenizer_revision", None),
        code_revision=getattr(args, "code_revision", None),
        download_dir=getattr(args, "download_dir", None),
        hf_token=getattr(args, "hf_token", None),
        generation_config=getattr(args, "generation_config", "auto"),
        override_generation_config=getattr(args, "override_generation_config", None),
    )


def _build_engine(engine_args):
    # Imported here, in the worker thread: importing torch takes seconds and must not
    # stall the event loop that is answering /health.
    from fastserve.engine.async_engine import AsyncEngine

    if engine_args.data_parallel_size > 1:
        from fastserve.distributed.async_replicas import DataParallelAsyncEngine

        return DataParallelAsyncEngine(engine_args)
    return AsyncEngine(engine_args)


async def load_engine(state: ServerState, engine_args) -> None:
    """Builds the engine in a worker thread (weights load for a while; the event loop keeps
    answering /health with 503 meanwhile), then starts its step loop."""
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    try:
        from fastserve.generation_config import generation_defaults_for

        state.generation_defaults = generation_defaults_for(engine_args)
        engine = await loop.run_in_executor(None, _build_engine, engine_args)
        await engine.start()
    except BaseException as e:
        state.load_error = e
        raise
    state.set_engine(engine)
    state.metrics.labels["model_name"] = state.served_model_names[0]
    state.metrics.set_max_model_len(state.max_model_len)
    logger.info(
        "engine ready in %.1f s: %s (max_model_len %d)",
        time.monotonic() - t0,
        state.served_model_names[0],
        state.max_model_len,
    )


class RunningServer:
    """A listening server whose engine loads in the background (`loaded` is that task)."""

    def __init__(self, state: ServerState, runner: web.AppRunner, loaded: asyncio.Future, port: int) -> None:
        self.state = state
        self.runner = runner
        self.loaded = loaded
        self.port = port

    async def stop(self) -> None:
        """Stop listening, let in-flight requests finish (up to the runner's shutdown
        timeout), then stop the engine."""
        self.state.draining = True
        # Stops the listener, closes idle keep-alive connections, waits for in-flight
        # handlers, then cancels what is left.
        await self.runner.cleanup()
        if not self.loaded.done():
            self.loaded.cancel()
        with contextlib.suppress(BaseException):
            await self.loaded
        if self.state.engine is not None:
            with contextlib.suppress(Exception):
                await self.state.engine.shutdown()


async def start_server(args, engine_args=None) -> RunningServer:
    """Listens on args.host:args.port at once and starts loading the engine."""
    from fastserve.chat_template import load_chat_template

    from .reasoning import get_reasoning_parser

    state = ServerState(
        served_model_names=list(args.served_model_name or [args.model]),
        model_path=args.model,
        api_key=args.api_key,
        chat_template=load_chat_template(args.chat_template),
        reasoning_parser=get_reasoning_parser(args.reasoning_parser),
        log_requests=not args.disable_log_requests,
        tool_call_parser=getattr(args, "tool_call_parser", None),
        enable_auto_tool_choice=getattr(args, "enable_auto_tool_choice", False),
    )
    engine_args = engine_args or engine_args_from(args)
    app = build_app(state, int(args.max_request_body_mb * 1024 * 1024))
    # handler_cancellation: a client that disconnects cancels its handler, whose finally
    # aborts the engine request and frees its KV blocks at once.
    runner = web.AppRunner(
        app, handle_signals=False, handler_cancellation=True, access_log=None, shutdown_timeout=args.shutdown_timeout
    )
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # the real port when args.port is 0
    logger.info("listening on http://%s:%d (loading %s)", args.host, port, args.model)
    loaded = asyncio.ensure_future(load_engine(state, engine_args))
    return RunningServer(state, runner, loaded, port)


async def serve(args, engine_args=None) -> int:
    """Runs until SIGINT/SIGTERM (exit code 0 after draining), a failed load (1) or the
    engine's death (1)."""
    server = await start_server(args, engine_args)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.ensure_future(stop.wait())
    code = 0
    try:
        await asyncio.wait({server.loaded, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if server.loaded.done() and server.loaded.exception() is not None:
            err = server.loaded.exception()
            # A ValueError is a bad flag or model directory: its message says what to fix.
            logger.error("failed to load the model: %s", err, exc_info=None if isinstance(err, ValueError) else err)
            code = 1
        else:
            died = server.state.engine.died
            await asyncio.wait({stopper, died}, return_when=asyncio.FIRST_COMPLETED)
            if died.done():
                # Its waiting clients already got an error; exiting (as vLLM does when its
                # engine core dies) lets a supervisor restart a server that cannot recover.
                logger.error("the engine died (%r): exiting with code 1", died.result())
                code = 1
            else:
                logger.info(
                    "shutting down: no new requests; waiting up to %.0f s for running ones", args.shutdown_timeout
                )
    finally:
        stopper.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()
    logger.info("server stopped")
    return code
