"""POST /v1/completions: one engine request per prompt; choice index = prompt index * n +
sample index, as OpenAI and vLLM number them."""

from __future__ import annotations

import contextlib
import time

from aiohttp import web

from .errors import bad_request
from .protocol import CompletionRequest
from .responses import Completions
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
    random_id,
    read_json,
    resolve_max_tokens,
    sampling_params,
    structured_outputs_spec,
    truncate,
)


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
    fmt = Completions(req, tok, request_id, int(time.time()), model, prompt_ids, prompt_texts, echo_k=echo_k)
    gens = [generate(state, f"{request_id}-{i}", ids, sp, text)
            for i, (ids, sp, text) in enumerate(zip(prompt_ids, params, prompt_texts))]
    async with contextlib.aclosing(merge(gens)) as merged:
        stream = await primed(merged)
        if req.stream:
            async with SSE(request) as sse:
                async for i, out in stream:
                    for c in fmt.chunks(i, out):
                        await sse.send(c)
                for c in fmt.closing():
                    await sse.send(c)
            return sse.response
        finals: dict[int, object] = {}
        async for i, out in stream:
            if out.finished:
                finals[i] = out
    return json_response(fmt.body(finals)[0])
