"""POST /v1/chat/completions: render the conversation with the chat template, generate, and
answer as OpenAI does (with reasoning_content split off when a reasoning parser is set)."""

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
    encode,
    generate,
    json_response,
    primed,
    prompt_logprobs_json,
    random_id,
    read_json,
    resolve_max_tokens,
    sampling_params,
    token_str,
    top_entries,
    truncate,
    usage,
)


def _entry(tokenizer, token_id: int, lp, as_id: bool) -> dict:
    s = token_str(tokenizer, token_id, lp, as_id)
    return {"token": s, "logprob": lp.logprob if lp is not None else None,
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


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    req: ChatCompletionRequest = await read_json(request, ChatCompletionRequest)
    engine = state.ready_engine()
    model = state.check_model(req.model)
    tok = engine.tokenizer
    max_model_len = engine.model_config.max_model_len

    text = await render_prompt(state, tok, req.messages, chat_template=req.chat_template,
                               chat_template_kwargs=req.chat_template_kwargs,
                               add_generation_prompt=req.add_generation_prompt,
                               continue_final_message=req.continue_final_message,
                               tools=req.tools)
    # The template already wrote BOS where the model wants it (vLLM's chat default).
    add_special = False if req.add_special_tokens is None else req.add_special_tokens
    ids = await encode(tok, text, add_special)
    if not ids:
        raise bad_request("the rendered conversation has no tokens", "messages")
    ids = truncate(ids, req.truncate_prompt_tokens, max_model_len)
    max_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(req.requested_max_tokens, len(ids), max_model_len,
                                    "messages", max_field)
    top_k = (req.top_logprobs or 0) if req.logprobs else None
    sp = sampling_params(req, max_tokens=max_tokens, logprobs=top_k,
                         wire_names={"logprobs": "top_logprobs", "max_tokens": max_field},
                         defaults=state.generation_defaults)

    request_id = random_id("chatcmpl")
    created = int(time.time())
    parser_cls = state.reasoning_parser
    async with contextlib.aclosing(generate(state, request_id, ids, sp, text)) as gen:
        stream = await primed(gen)
        if req.stream:
            return await _streamed(request, req, tok, parser_cls, request_id, created, model,
                                   stream, len(ids), top_k)
        final = None
        async for out in stream:
            final = out
        choices, completion_tokens = [], 0
        for o in sorted(final.outputs, key=lambda o: o.index):
            completion_tokens += len(o.token_ids)
            message = {"role": "assistant", "content": o.text}
            if parser_cls is not None:
                reasoning, content = parser_cls().parse(o.text)
                message = {"role": "assistant", "content": content,
                           "reasoning_content": reasoning}
            message["tool_calls"] = []
            choices.append({
                "index": o.index, "message": message,
                "logprobs": (_logprobs(tok, o.logprobs or [], o.token_ids, top_k,
                                       req.return_tokens_as_token_ids)
                             if top_k is not None else None),
                "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
        return json_response({
            "id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "prompt_logprobs": prompt_logprobs_json(final),
            "usage": usage(len(ids), completion_tokens, getattr(final, "num_cached_tokens", None))})


async def _streamed(request, req, tok, parser_cls, request_id, created, model, stream,
                    num_prompt_tokens, top_k):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    base = {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": model}
    continuous = include_usage and req.stream_options.continuous_usage_stats
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    done: set[int] = set()
    parsers: dict[int, object] = {}
    completion_tokens = 0

    def chunk(index: int, delta: dict, finish_reason=None, stop_reason=None, logprobs=None):
        choice = {"index": index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": finish_reason}
        if finish_reason:
            choice["stop_reason"] = stop_reason
        c = {**base, "choices": [choice]}
        if include_usage:  # OpenAI: null on every chunk but the last, unless continuous
            c["usage"] = usage(num_prompt_tokens, sum(sent_tokens.values())) \
                if continuous else None
        return c

    def split(index: int, delta_text: str, final: bool) -> dict:
        if parser_cls is None:
            return {"content": delta_text} if delta_text else {}
        p = parsers.setdefault(index, parser_cls())
        reasoning, content = p.feed(delta_text)
        if final:
            r2, c2 = p.flush()
            reasoning, content = reasoning + r2, content + c2
        d = {}
        if reasoning:
            d["reasoning_content"] = reasoning
        if content:
            d["content"] = content
        return d

    async with SSE(request) as sse:
        for i in range(req.n):
            # OpenAI opens every choice with the role and empty content.
            sent_text[i] = sent_tokens[i] = 0
            await sse.send(chunk(i, {"role": "assistant", "content": ""}))
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
                    await sse.send(chunk(i, delta, logprobs=lp))
                if finished:
                    done.add(i)
                    completion_tokens += len(o.token_ids)
                    await sse.send(chunk(i, {}, o.finish_reason, o.stop_reason))
        if include_usage:
            await sse.send({**base, "choices": [],
                            "usage": usage(num_prompt_tokens, completion_tokens)})
    return sse.response

