"""POST /v1/completions, in flow order: decode and validate (protocol) -> render the prompts
(prompts) -> build the parameters (params) -> the engine, one request per prompt (generate)
-> format the answer (responses; choice index = prompt index * n + sample index, as OpenAI
and vLLM number them), whole or streamed (sse). `prepare()` is also what `fastserve
run-batch` runs for a completions line."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .generate import generate, merge, primed
from .params import compile_constraint, resolve_max_tokens, sampling_params, structured_outputs_spec
from .prompts import completion_prompts
from .protocol import CompletionRequest, read_request
from .responses import Completions, random_id
from .sse import SSE, json_response
from .state import STATE, ServerState, Serving


@dataclass
class CompletionPlan:
    """A completions request ready for the engine: per prompt its field, text, ids and
    SamplingParams; `echo_k` the logprobs count of echoed prompt tokens."""

    req: CompletionRequest
    fields: list[str]
    texts: list[str | None]
    prompt_ids: list[list[int]]
    params: list[Any]  # SamplingParams
    echo_k: int | None

    def formatter(self, tokenizer, request_id: str, created: int, model: str) -> Completions:
        return Completions(
            self.req, tokenizer, request_id, created, model, self.prompt_ids, self.texts, echo_k=self.echo_k
        )


async def prepare(serving: Serving, req: CompletionRequest) -> CompletionPlan:
    """Prompts and SamplingParams of a decoded completions request; a 400 naming the field
    when the request cannot run."""
    constraint = structured_outputs_spec(req)
    # vLLM: echo with logprobs reports the prompt's tokens too, from prompt logprobs.
    echo_k = req.logprobs if req.echo and req.logprobs is not None and req.prompt_logprobs is None else None
    fields, texts, all_ids, params = [], [], [], []
    for field, text, ids in await completion_prompts(serving, req):
        max_tokens = resolve_max_tokens(req.max_tokens, len(ids), serving.max_model_len, field, "max_tokens")
        params.append(
            sampling_params(
                req,
                max_tokens=max_tokens,
                logprobs=req.logprobs,
                defaults=serving.generation_defaults,
                structured_outputs=constraint,
                prompt_logprobs=echo_k,
            )
        )
        fields.append(field)
        texts.append(text)
        all_ids.append(ids)
    await compile_constraint(serving.structured, constraint)
    return CompletionPlan(req, fields, texts, all_ids, params, echo_k)


async def create_completion(request: web.Request) -> web.StreamResponse:
    state: ServerState = request.app[STATE]
    req = await read_request(request, CompletionRequest)
    engine = state.ready_engine()
    model = state.check_model(req.model)
    plan = await prepare(state.serving(), req)
    request_id = random_id("cmpl", req.request_id)
    fmt = plan.formatter(engine.tokenizer, request_id, int(time.time()), model)
    streams = [
        generate(engine, state.metrics, f"{request_id}-{i}", ids, sp, text)
        for i, (ids, sp, text) in enumerate(zip(plan.prompt_ids, plan.params, plan.texts))
    ]
    async with contextlib.aclosing(merge(streams)) as merged:
        outputs = await primed(merged)
        if req.stream:
            async with SSE(request) as sse:
                async for i, out in outputs:
                    await sse.send_all(fmt.chunks(i, out))
                await sse.send_all(fmt.closing())
            return sse.response
        finals: dict[int, Any] = {}
        async for i, out in outputs:
            if out.finished:
                finals[i] = out
    return json_response(fmt.body(finals)[0])
