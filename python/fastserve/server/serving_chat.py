"""POST /v1/chat/completions, in flow order: decode and validate (protocol) -> render the
prompt (prompts: the chat template) -> build the parameters (params) -> the engine
(generate) -> format the answer (responses), whole or streamed (sse).

Answers as OpenAI and vLLM do: reasoning split off when a reasoning parser is set (as
`reasoning` and `reasoning_content`), tool calls parsed into `tool_calls` when the server has
a tool-call parser, and the output constrained when the request asks for a format.
`prepare()` is also what `fastserve run-batch` runs for a chat line."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .generate import generate, primed
from .params import compile_constraint, resolve_max_tokens, sampling_params, structured_outputs_spec
from .prompts import chat_prompt, chat_template_kwargs
from .protocol import ChatCompletionRequest, read_request
from .responses import Chat, random_id
from .sse import SSE, json_response
from .state import STATE, ServerState, Serving
from .tool_parsers.request import ToolCalling


@dataclass
class ChatPlan:
    """A chat request ready for the engine, and what formatting its answer needs."""

    req: ChatCompletionRequest
    text: str
    prompt_ids: list[int]
    params: Any  # SamplingParams
    tools: ToolCalling | None
    reasoning_parser: Any  # the parser class for this request, None when off
    with_reasoning_content: bool

    def formatter(self, tokenizer, request_id: str, created: int, model: str, role: str = "assistant") -> Chat:
        return Chat(
            self.req,
            tokenizer,
            request_id,
            created,
            model,
            self.prompt_ids,
            self.text,
            reasoning_parser=self.reasoning_parser,
            reasoning_content=self.with_reasoning_content,
            tools=self.tools,
            role=role,
        )


async def prepare(serving: Serving, req: ChatCompletionRequest) -> ChatPlan:
    """Prompt and SamplingParams of a decoded chat request; a 400 naming the field when the
    request cannot run."""
    tools = ToolCalling.for_request(req, serving.tool_call_parser, serving.enable_auto_tool_choice)
    constraint = structured_outputs_spec(req)
    if tools is not None:
        constraint = tools.constraint(constraint)
    template_kwargs = chat_template_kwargs(req)
    text, ids = await chat_prompt(serving, req, template_kwargs)
    max_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(req.requested_max_tokens, len(ids), serving.max_model_len, "messages", max_field)
    # A parser whose markers may be special tokens needs them in the text (vLLM does the same).
    keep_special = False if tools is not None and tools.parser.keep_special_tokens else None
    params = sampling_params(
        req,
        max_tokens=max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        defaults=serving.generation_defaults,
        structured_outputs=constraint,
        skip_special_tokens=keep_special,
        prompt_logprobs=(req.top_logprobs or 0) if req.echo else None,
    )
    await compile_constraint(serving.structured, constraint)
    # No reasoning parser when thinking is switched off: the answer is then content.
    thinking_off = (template_kwargs or {}).get("enable_thinking") is False
    return ChatPlan(
        req,
        text,
        ids,
        params,
        tools,
        None if thinking_off else serving.reasoning_parser,
        serving.reasoning_parser is not None,
    )


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    req = await read_request(request, ChatCompletionRequest)
    engine = state.ready_engine()
    model = state.check_model(req.model)
    plan = await prepare(state.serving(), req)
    request_id = random_id("chatcmpl", req.request_id)
    fmt = plan.formatter(engine.tokenizer, request_id, int(time.time()), model)
    stream = generate(engine, state.metrics, request_id, plan.prompt_ids, plan.params, plan.text)
    async with contextlib.aclosing(stream) as gen:
        outputs = await primed(gen)
        if req.stream:
            async with SSE(request) as sse:
                await sse.send_all(fmt.opening())
                async for out in outputs:
                    await sse.send_all(fmt.chunks(out))
                await sse.send_all(fmt.closing())
            return sse.response
        final = None
        async for out in outputs:
            final = out
    return json_response(fmt.body(final)[0])
