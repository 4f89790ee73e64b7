"""POST /v1/chat/completions: render the conversation with the chat template, generate, and
answer as OpenAI and vLLM do: reasoning split off when a reasoning parser is set (as
`reasoning` and `reasoning_content`), tool calls parsed into `tool_calls` when the server has
a tool-call parser, and the output constrained when the request asks for a format."""

from __future__ import annotations

import contextlib
import time

from aiohttp import web

from fastserve.chat_template import render_chat

from .errors import bad_request
from .protocol import ChatCompletionRequest, messages_to_dicts
from .responses import Chat
from .serving_base import (
    SSE,
    STATE,
    ServerState,
    compile_constraint,
    encode,
    generate,
    json_response,
    primed,
    random_id,
    read_json,
    resolve_max_tokens,
    sampling_params,
    structured_outputs_spec,
    truncate,
)
from .tool_parsers.request import ToolCalling

_REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


async def render_prompt(state: ServerState, tokenizer, messages, *, chat_template: str | None,
                        chat_template_kwargs, add_generation_prompt: bool,
                        continue_final_message: bool, tools=None) -> str:
    try:
        return render_chat(tokenizer, messages_to_dicts(messages),
                           chat_template=chat_template or state.chat_template,
                           add_generation_prompt=add_generation_prompt,
                           chat_template_kwargs=chat_template_kwargs, tools=tools,
                           continue_final_message=continue_final_message)
    except ValueError as e:
        param = "chat_template" if "chat_template" in str(e) or "template" in str(e) else "messages"
        raise bad_request(str(e), param) from None
    except Exception as e:  # noqa: BLE001 - the sandbox's refusals (OverflowError, SecurityError...)
        # Rendering depends only on the request (its messages, maybe its own template): a
        # template that breaks on them is the request's fault, never a 500.
        param = "chat_template" if chat_template else "messages"
        raise bad_request(f"the chat template failed to render: {type(e).__name__}: {e}",
                          param) from None


def _template_kwargs(req: ChatCompletionRequest) -> dict | None:
    """chat_template_kwargs plus vLLM's extras for the template: reasoning_effort (and the
    enable_thinking switch it implies unless given) and documents."""
    kw = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:
        if req.reasoning_effort not in _REASONING_EFFORTS:
            raise bad_request(f"reasoning_effort must be one of {', '.join(_REASONING_EFFORTS)}",
                              "reasoning_effort")
        kw.setdefault("reasoning_effort", req.reasoning_effort)
        kw.setdefault("enable_thinking", req.reasoning_effort != "none")
    if req.documents is not None:
        kw.setdefault("documents", req.documents)
    return kw or None


def _reasoning_parser(state: ServerState, req: ChatCompletionRequest, template_kwargs: dict | None):
    """The reasoning parser for this request: none when thinking is switched off (the answer
    is then content, never reasoning)."""
    if state.reasoning_parser is None:
        return None
    if (template_kwargs or {}).get("enable_thinking") is False:
        return None
    return state.reasoning_parser


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    req: ChatCompletionRequest = await read_json(request, ChatCompletionRequest)
    engine = state.ready_engine()
    model = state.check_model(req.model)
    tok = engine.tokenizer
    max_model_len = engine.model_config.max_model_len

    tools = ToolCalling.for_request(req, state.tool_call_parser, state.enable_auto_tool_choice)
    constraint = structured_outputs_spec(req)
    if tools is not None:
        constraint = tools.constraint(constraint)
    template_kwargs = _template_kwargs(req)
    text = await render_prompt(state, tok, req.messages, chat_template=req.chat_template,
                               chat_template_kwargs=template_kwargs,
                               add_generation_prompt=req.add_generation_prompt,
                               continue_final_message=req.continue_final_message,
                               tools=req.tools)
    # The template already wrote BOS where the model wants it (vLLM's chat default).
    add_special = False if req.add_special_tokens is None else req.add_special_tokens
    ids = await encode(tok, text, add_special)
    if not ids:
        raise bad_request("the rendered conversation has no tokens", "messages")
    ids = truncate(ids, req.truncate_prompt_tokens, max_model_len, req.truncation_side)
    max_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(req.requested_max_tokens, len(ids), max_model_len,
                                    "messages", max_field)
    top_k = (req.top_logprobs or 0) if req.logprobs else None
    # A parser whose markers may be special tokens needs them in the text (vLLM does the same).
    keep_special = False if tools is not None and tools.parser.keep_special_tokens else None
    sp = sampling_params(req, max_tokens=max_tokens, logprobs=top_k,
                         defaults=state.generation_defaults,
                         structured_outputs=constraint, skip_special_tokens=keep_special,
                         prompt_logprobs=(req.top_logprobs or 0) if req.echo else None)
    await compile_constraint(state, constraint)

    request_id = random_id("chatcmpl", req.request_id)
    fmt = Chat(req, tok, request_id, int(time.time()), model, ids, text,
               reasoning_parser=_reasoning_parser(state, req, template_kwargs),
               reasoning_content=state.reasoning_parser is not None, tools=tools)
    async with contextlib.aclosing(generate(state, request_id, ids, sp, text)) as gen:
        stream = await primed(gen)
        if req.stream:
            async with SSE(request) as sse:
                for c in fmt.opening():
                    await sse.send(c)
                async for out in stream:
                    for c in fmt.chunks(out):
                        await sse.send(c)
                for c in fmt.closing():
                    await sse.send(c)
            return sse.response
        final = None
        async for out in stream:
            final = out
        return json_response(fmt.body(final)[0])
