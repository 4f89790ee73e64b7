"""POST /v1/completions: one engine request per prompt; choice index = prompt index * n +
sample index, as OpenAI and vLLM number them."""

from __future__ import annotations

import contextlib
import time

from aiohttp import web

from .errors import bad_request
from .protocol import CompletionRequest
from .serving_base import (
    SSE,
    STATE,
    ServerState,
    check_token_ids,
    compile_constraint,
    encode,
    generate,
    json_response,
    merge,
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


# vLLM's floor for a reported logprob (a grammar-masked token's is -inf, which JSON lacks).
_MIN_LOGPROB = -9999.0


def _logprobs(tokenizer, steps: list, token_ids: list[int], k: int, offset: int,
              as_ids: bool) -> dict:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset.
    `offset` is the text length before these tokens (text_offset counts from the choice's
    start). A step of None (the first prompt token under echo) has no logprob."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for tid, step in zip(token_ids, steps):
        if step is None:
            s = f"token_id:{tid}" if as_ids else tokenizer.decode([tid], skip_special_tokens=False)
            tokens.append(s)
            token_logprobs.append(None)
            tops.append(None)
            offsets.append(offset)
            offset += len(s)
            continue
        chosen = step.get(tid)
        s = token_str(tokenizer, tid, chosen, as_ids)
        tokens.append(s)
        token_logprobs.append(max(chosen.logprob, _MIN_LOGPROB) if chosen is not None else None)
        # vLLM's rule: the sampled token, then the top k, so up to k + 1 entries.
        top = {} if chosen is None else {s: max(chosen.logprob, _MIN_LOGPROB)}
        for t, lp in top_entries(step, k):
            top.setdefault(token_str(tokenizer, t, lp, as_ids), max(lp.logprob, _MIN_LOGPROB))
        tops.append(top)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": offsets}


def _merge_logprobs(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


async def create_completion(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    req: CompletionRequest = await read_json(request, CompletionRequest)
    engine = state.ready_engine()
    model = state.check_model(req.model)
    tok = engine.tokenizer
    max_model_len = engine.model_config.max_model_len
    vocab_size = engine.model_config.vocab_size
    add_special = True if req.add_special_tokens is None else req.add_special_tokens

    constraint = structured_outputs_spec(req)
    # vLLM: echo with logprobs reports the prompt's tokens too, from prompt logprobs.
    echo_k = req.logprobs if req.echo and req.logprobs is not None and req.prompt_logprobs is None else None
    prompts = req.prompts()
    many = len(prompts) > 1
    prompt_ids, prompt_texts, params = [], [], []
    for i, p in enumerate(prompts):
        field = f"prompt[{i}]" if many else "prompt"
        if isinstance(p, str):
            ids = await encode(tok, p, add_special)
            if not ids:
                raise bad_request(f"{field} encodes to no tokens; send some text", field)
        else:
            ids = p
            check_token_ids(ids, vocab_size, field)
        ids = truncate(ids, req.truncate_prompt_tokens, max_model_len, req.truncation_side)
        max_tokens = resolve_max_tokens(req.max_tokens, len(ids), max_model_len, field,
                                        "max_tokens")
        prompt_ids.append(ids)
        prompt_texts.append(p if isinstance(p, str) else None)
        params.append(sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs,
                                      defaults=state.generation_defaults,
                                      structured_outputs=constraint, prompt_logprobs=echo_k))
    await compile_constraint(state, constraint)

    request_id = random_id("cmpl", req.request_id)
    created = int(time.time())
    gens = [generate(state, f"{request_id}-{i}", ids, sp, text)
            for i, (ids, sp, text) in enumerate(zip(prompt_ids, params, prompt_texts))]

    def echo_text(i: int) -> str:
        if not req.echo:
            return ""
        return prompt_texts[i] if prompt_texts[i] is not None else tok.decode(prompt_ids[i])

    def echo_logprobs(i: int, out) -> dict | None:
        """The prompt's entries of an echoed choice's logprobs (first prompt token: null)."""
        if echo_k is None or out.prompt_logprobs is None:
            return None
        return _logprobs(tok, out.prompt_logprobs, prompt_ids[i], echo_k, 0, req.return_tokens_as_token_ids)

    base = {"id": request_id, "object": "text_completion", "created": created, "model": model}
    num_prompt_tokens = sum(len(ids) for ids in prompt_ids)
    async with contextlib.aclosing(merge(gens)) as merged:
        stream = await primed(merged)
        if req.stream:
            return await _streamed(request, req, tok, base, stream, num_prompt_tokens, echo_text, echo_logprobs,
                                   prompt_ids)
        finals: dict[int, object] = {}
        async for i, out in stream:
            if out.finished:
                finals[i] = out
    choices, completion_tokens = [], 0
    for i in range(len(prompt_ids)):
        prefix = echo_text(i)
        for o in sorted(finals[i].outputs, key=lambda o: o.index):
            completion_tokens += len(o.token_ids)
            lp = None
            if req.logprobs is not None:
                lp = _logprobs(tok, o.logprobs or [], o.token_ids, req.logprobs, len(prefix),
                               req.return_tokens_as_token_ids)
                if (echoed := echo_logprobs(i, finals[i])) is not None:
                    lp = _merge_logprobs(echoed, lp)
            choices.append({
                "index": i * req.n + o.index, "text": prefix + o.text, "logprobs": lp,
                "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                "token_ids": list(o.token_ids) if req.return_token_ids else None,
                "prompt_logprobs": prompt_logprobs_json(finals[i]),
                "prompt_token_ids": list(prompt_ids[i]) if req.return_token_ids else None})
    return json_response({**base, "choices": choices, "service_tier": None, "system_fingerprint": None,
                          "usage": usage(num_prompt_tokens, completion_tokens)})


async def _streamed(request, req, tok, base, stream, num_prompt_tokens, echo_text, echo_logprobs, prompt_ids):
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = include_usage and req.stream_options.continuous_usage_stats
    sent_text: dict[int, int] = {}  # choice index -> characters sent; -1 once finished
    sent_tokens: dict[int, int] = {}
    completion_tokens = 0
    async with SSE(request) as sse:
        async for i, out in stream:
            for o in out.outputs:
                idx = i * req.n + o.index
                if sent_text.get(idx) == -1:
                    continue
                first = idx not in sent_text
                t0, k0 = sent_text.get(idx, 0), sent_tokens.get(idx, 0)
                delta = o.text[t0:]
                new_ids = o.token_ids[k0:]
                if not delta and not new_ids and o.finish_reason is None and not first:
                    continue
                prefix = echo_text(i) if first else ""
                chunk = {"index": idx, "text": prefix + delta, "logprobs": None,
                         "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                if req.return_token_ids:
                    chunk["token_ids"] = list(new_ids)
                    if first:
                        chunk["prompt_token_ids"] = list(prompt_ids[i])
                if req.logprobs is not None:
                    chunk["logprobs"] = _logprobs(tok, (o.logprobs or [])[k0:], new_ids,
                                                  req.logprobs, len(prefix) + t0,
                                                  req.return_tokens_as_token_ids)
                    if first and (echoed := echo_logprobs(i, out)) is not None:
                        chunk["logprobs"] = _merge_logprobs(echoed, chunk["logprobs"])
                sent_text[idx] = len(o.text) if o.finish_reason is None else -1
                sent_tokens[idx] = len(o.token_ids)
                if o.finish_reason is not None:
                    completion_tokens += len(o.token_ids)
                extra = {}
                if include_usage:  # OpenAI: null on every chunk but the last, unless continuous
                    extra["usage"] = usage(num_prompt_tokens, sum(sent_tokens.values())) \
                        if continuous else None
                await sse.send({**base, "choices": [chunk], **extra})
        if include_usage:
            await sse.send({**base, "choices": [],
                            "usage": usage(num_prompt_tokens, completion_tokens)})
    return sse.response
