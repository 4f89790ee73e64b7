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
from .serving_base import (
    SSE,
    STATE,
    ServerState,
    compile_constraint,
    encode,
    generate,
    json_response,
    primed,
    prompt_logprobs_json,
    random_id,
    read_json,
    resolve_max_tokens,
    sampling_params,
    structured_outputs_spec,
    token_str,
    top_entries,
    truncate,
    usage,
)
from .tool_parsers.request import ToolCalling

# vLLM's floor for a logprob in chat answers (a grammar-masked token's is -inf, not JSON).
_MIN_LOGPROB = -9999.0
_REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


def _entry(tokenizer, token_id: int, lp, as_id: bool) -> dict:
    s = token_str(tokenizer, token_id, lp, as_id)
    return {"token": s, "logprob": max(lp.logprob, _MIN_LOGPROB) if lp is not None else None,
            "bytes": list(s.encode("utf-8"))}


def _logprobs(tokenizer, steps: list[dict], token_ids: list[int], k: int, as_ids: bool) -> dict:
    content = []
    for tid, step in zip(token_ids, steps):
        e = _entry(tokenizer, tid, step.get(tid), as_ids)
        e["top_logprobs"] = [_entry(tokenizer, t, lp, as_ids) for t, lp in top_entries(step, k)]
        content.append(e)
    return {"content": content}


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


def _echo_prefix(req: ChatCompletionRequest) -> str:
    """vLLM's chat echo: the new message starts with the last message's content when that
    message is the assistant's (the role being answered)."""
    if not req.echo or req.messages[-1].role != "assistant":
        return ""
    content = req.messages[-1].content
    if isinstance(content, list):
        return "\n".join(p.text or "" for p in content)
    return content or ""


def _message(content, reasoning, tool_calls: list[dict], with_reasoning_content: bool) -> dict:
    m = {"role": "assistant", "content": content, "refusal": None, "annotations": None, "audio": None,
         "function_call": None}
    if tool_calls:
        m["tool_calls"] = tool_calls
    m["reasoning"] = reasoning
    if with_reasoning_content:
        m["reasoning_content"] = reasoning
    return m


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
                         wire_names={"logprobs": "top_logprobs", "max_tokens": max_field},
                         defaults=state.generation_defaults,
                         structured_outputs=constraint, skip_special_tokens=keep_special,
                         prompt_logprobs=(req.top_logprobs or 0) if req.echo else None)
    await compile_constraint(state, constraint)

    request_id = random_id("chatcmpl", req.request_id)
    created = int(time.time())
    parser_cls = _reasoning_parser(state, req, template_kwargs)
    async with contextlib.aclosing(generate(state, request_id, ids, sp, text)) as gen:
        stream = await primed(gen)
        if req.stream:
            return await _streamed(request, req, tok, parser_cls, tools, request_id, created, model,
                                   stream, ids, top_k, state.reasoning_parser is not None, text)
        final = None
        async for out in stream:
            final = out
        choices, completion_tokens = [], 0
        echo = _echo_prefix(req)
        for o in sorted(final.outputs, key=lambda o: o.index):
            completion_tokens += len(o.token_ids)
            reasoning, content = None, o.text
            if parser_cls is not None:
                reasoning, content = parser_cls().parse(o.text)
            if not req.include_reasoning:
                reasoning = None
            tool_calls, finish_reason = [], o.finish_reason
            if tools is not None:
                content, tool_calls, called = tools.message(content)
                finish_reason = tools.finish_reason(o.finish_reason, called)
            if echo:
                content = echo + (content or "")
            choices.append({
                "index": o.index,
                "message": _message(content, reasoning, tool_calls, state.reasoning_parser is not None),
                "logprobs": (_logprobs(tok, o.logprobs or [], o.token_ids, top_k,
                                       req.return_tokens_as_token_ids)
                             if top_k is not None else None),
                "finish_reason": finish_reason, "stop_reason": o.stop_reason,
                "token_ids": list(o.token_ids) if req.return_token_ids else None})
        return json_response({
            "id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "service_tier": None, "system_fingerprint": None,
            "usage": usage(len(ids), completion_tokens, getattr(final, "num_cached_tokens", None)),
            "prompt_logprobs": prompt_logprobs_json(final),
            "prompt_token_ids": list(ids) if req.return_token_ids else None,
            "prompt_text": text if req.return_prompt_text else None})


async def _streamed(request, req, tok, parser_cls, tools, request_id, created, model, stream,
                    prompt_ids, top_k, with_reasoning_content: bool, prompt_text: str):
    num_prompt_tokens = len(prompt_ids)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": model}
    continuous = include_usage and req.stream_options.continuous_usage_stats
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    done: set[int] = set()
    parsers: dict[int, object] = {}
    streamers: dict[int, object] = {}
    called: dict[int, bool] = {}
    completion_tokens = 0
    first_chunk = True

    def chunk(index: int, delta: dict, finish_reason=None, stop_reason=None, logprobs=None, token_ids=None):
        nonlocal first_chunk
        choice = {"index": index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        if finish_reason:
            choice["stop_reason"] = stop_reason
        if req.return_token_ids:
            choice["token_ids"] = token_ids
        c = {**base, "choices": [choice]}
        if req.return_token_ids and first_chunk:
            c["prompt_token_ids"] = list(prompt_ids)
        if req.return_prompt_text and first_chunk:
            c["prompt_text"] = prompt_text
        first_chunk = False
        if include_usage:  # OpenAI: null on every chunk but the last, unless continuous
            c["usage"] = usage(num_prompt_tokens, sum(sent_tokens.values())) \
                if continuous else None
        return c

    def split(index: int, delta_text: str, final: bool) -> dict:
        reasoning, content = "", delta_text
        if parser_cls is not None:
            p = parsers.setdefault(index, parser_cls())
            reasoning, content = p.feed(delta_text)
            if final:
                r2, c2 = p.flush()
                reasoning, content = reasoning + r2, content + c2
            if not req.include_reasoning:
                reasoning = ""
        d = {}
        if reasoning:
            d["reasoning"] = reasoning
            if with_reasoning_content:
                d["reasoning_content"] = reasoning
        if tools is not None:
            s = streamers.setdefault(index, tools.streamer())
            content, calls = s.feed(content)
            if final:
                c2, calls2 = s.finish()
                content, calls = content + c2, calls + calls2
            if calls and tools.parallel_tool_calls is False:
                calls = [c for c in calls if c["index"] == 0]
            if calls:
                called[index] = True
                d["tool_calls"] = calls
        if content:
            d["content"] = content
        return d

    async with SSE(request) as sse:
        echo = _echo_prefix(req)
        for i in range(req.n):
            # OpenAI opens every choice with the role and empty content.
            sent_text[i] = sent_tokens[i] = 0
            await sse.send(chunk(i, {"role": "assistant", "content": echo}))
        async for out in stream:
            for o in out.outputs:
                i = o.index
                if i in done:
                    continue
                t0, k0 = sent_text[i], sent_tokens[i]
                finished = o.finish_reason is not None
                delta = split(i, o.text[t0:], finished)
                new_ids = o.token_ids[k0:]
                sent_text[i], sent_tokens[i] = len(o.text), len(o.token_ids)
                if delta or (top_k is not None and new_ids):
                    lp = (_logprobs(tok, (o.logprobs or [])[k0:], new_ids, top_k,
                                    req.return_tokens_as_token_ids)
                          if top_k is not None else None)
                    await sse.send(chunk(i, delta, logprobs=lp, token_ids=list(new_ids)))
                    new_ids = []
                if finished:
                    done.add(i)
                    completion_tokens += len(o.token_ids)
                    reason = o.finish_reason
                    if tools is not None:
                        reason = tools.finish_reason(o.finish_reason, called.get(i, False))
                    await sse.send(chunk(i, {}, reason, o.stop_reason, token_ids=list(new_ids)))
        if include_usage:
            await sse.send({**base, "choices": [],
                            "usage": usage(num_prompt_tokens, completion_tokens)})
    return sse.response
