"""What the handlers share: `ServerState` (the engine once loaded, the served names, the
server's flags, metrics), and `Serving`, the part of it a request's preparation reads (also
built by `fastserve run-batch` from its offline engine, so both prepare requests alike)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .errors import APIError
from .metrics import ServerMetrics

if TYPE_CHECKING:
    from fastserve.engine.client import EngineClient


@dataclass(frozen=True)
class Serving:
    """What turning a request into prompts and SamplingParams reads: the tokenizer and model
    limits, the server's chat template / reasoning / tool-call flags, generation_config
    defaults, and the grammar compiler (None: the engine compiles it when the request runs)."""

    tokenizer: Any
    max_model_len: int
    vocab_size: int
    chat_template: str | None = None
    reasoning_parser: Any = None
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    structured: Any = None


class ServerState:
    """Everything the handlers share. `engine` is None until the background load finishes."""

    def __init__(
        self,
        *,
        served_model_names: list[str],
        model_path: str,
        api_key: str | None,
        chat_template: str | None,
        reasoning_parser,
        max_model_len: int | None = None,
        log_requests: bool = True,
        tool_call_parser: str | None = None,
        enable_auto_tool_choice: bool = False,
    ) -> None:
        self.engine: EngineClient | None = None
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

    def set_engine(self, engine: EngineClient) -> None:
        self.engine = engine
        self.served_model_names = list(engine.served_model_names or self.served_model_names)
        self.max_model_len = engine.model_config.max_model_len

    def ready_engine(self) -> EngineClient:
        if self.draining:
            raise APIError("the server is shutting down", 503, code="shutting_down")
        if self.engine is None:
            if self.load_error is not None:
                raise APIError(f"the model failed to load: {self.load_error}", 503, code="model_load_failed")
            raise APIError("the model is still loading; retry when GET /health returns 200", 503, code="model_loading")
        if self.engine.errored:
            raise APIError(
                "the engine stopped after an internal error (see the server log); restart the server",
                503,
                code="engine_dead",
            )
        return self.engine

    def serving(self) -> Serving:
        engine = self.ready_engine()
        return Serving(
            tokenizer=engine.tokenizer,
            max_model_len=engine.model_config.max_model_len,
            vocab_size=engine.model_config.vocab_size,
            chat_template=self.chat_template,
            reasoning_parser=self.reasoning_parser,
            tool_call_parser=self.tool_call_parser,
            enable_auto_tool_choice=self.enable_auto_tool_choice,
            generation_defaults=self.generation_defaults,
            structured=engine.structured,
        )

    def check_model(self, name: str | None) -> str:
        if name is None or name in self.served_model_names:
            return self.served_model_names[0] if name is None else name
        raise APIError(
            f"The model `{name}` does not exist; this server serves {', '.join(self.served_model_names)}",
            404,
            param="model",
            code="model_not_found",
        )


STATE: web.AppKey[ServerState] = web.AppKey("state", ServerState)
# The decoded request struct, kept on the aiohttp request so that an error raised anywhere
# later is answered with the param named as this request's wire format names it.
REQUEST: web.RequestKey[Any] = web.RequestKey("request", object)
