"""Build the parameters: the structured-outputs constraint (compiled before anything is
queued), the length rule (vLLM's: the prompt must leave room; prompt + max_tokens may not
exceed max_model_len) and SamplingParams from the request's fields.

SamplingParams validates every sampling field itself (InvalidRequest naming it; the request
struct maps the name to the wire's), so nothing here re-checks what it checks."""

from __future__ import annotations

import asyncio
from typing import Any

from fastserve.errors import InvalidRequest

from .errors import bad_request

# A grammar that takes longer than this to compile is refused (a 400), not waited for.
COMPILE_TIMEOUT_S = 30.0

# Request fields passed to SamplingParams as they are, when the client set them.
_PASSED = (
    "best_of",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "bad_words",
    "prompt_logprobs",
    "allowed_token_ids",
)


def structured_outputs_spec(req):
    """The request's structured-outputs constraint (response_format, structured_outputs or
    guided_*), or None; a malformed one raises StructuredOutputsError naming its field."""
    from fastserve.structured_outputs.request import structured_outputs_from_request

    return structured_outputs_from_request(**req.structured_output_fields())


async def compile_constraint(structured, spec) -> None:
    """Compiles `spec` in the engine's grammar pool (`structured`), off the event loop and
    the step thread, so that an invalid schema, regex or grammar is a 400 before anything is
    queued and the engine finds the grammar cached."""
    if spec is None or structured is None:
        return
    try:
        fut = structured.submit(spec)
        # shield: a timed-out wait must not cancel the shared (cached) compile.
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), COMPILE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise InvalidRequest(
            f"compiling the {spec.kind} constraint took longer than {COMPILE_TIMEOUT_S:.0f} s; simplify it", spec.param
        ) from None


def resolve_max_tokens(
    requested: int | None, prompt_len: int, max_model_len: int, prompt_field: str, max_tokens_field: str
) -> int:
    """vLLM's rule: the prompt must leave room, and prompt + max_tokens may not exceed
    max_model_len (400); no max_tokens means "up to the context length". (max_tokens < 1 is
    SamplingParams' rule.)"""
    if prompt_len >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"{prompt_field} has {prompt_len} tokens. Please shorten it (or set "
            f"truncate_prompt_tokens).",
            prompt_field,
        )
    if requested is None:
        return max_model_len - prompt_len
    if prompt_len + requested > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the {prompt_field}, "
            f"{requested} in the completion). Please reduce the length of the {prompt_field} "
            f"or {max_tokens_field}.",
            max_tokens_field,
        )
    return requested


def sampling_params(
    req,
    *,
    max_tokens: int,
    logprobs: int | None,
    defaults: dict[str, Any] | None = None,
    structured_outputs=None,
    prompt_logprobs: int | None = None,
    skip_special_tokens: bool | None = None,
):
    """SamplingParams from the request's fields (only those the client set), the fields it
    left unset taken from `defaults` (the model's generation_config.json, see
    fastserve.generation_config), then SamplingParams' own."""
    from fastserve.sampling_params import SamplingParams

    kw: dict[str, Any] = {"n": req.n, "max_tokens": max_tokens}
    for name in _PASSED:
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
