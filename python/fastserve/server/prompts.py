"""Render the prompt: a chat request's messages through the chat template, a completions
request's prompts, into token ids (encoded off the event loop when long), truncated as the
request asks; an empty or out-of-vocabulary prompt is a 400 naming its field."""

from __future__ import annotations

import asyncio

from fastserve.chat_template import render_chat

from .errors import bad_request
from .protocol import messages_to_dicts

# Prompts longer than this (characters) are encoded in a worker thread: the Rust encoder
# releases the GIL, so the event loop keeps serving other requests meanwhile.
_INLINE_ENCODE_CHARS = 8192
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


async def encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    if len(text) <= _INLINE_ENCODE_CHARS:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    loop = asyncio.get_running_loop()
    ids = await loop.run_in_executor(None, tokenizer.encode_batch, [text], add_special_tokens)
    return ids[0]


def check_token_ids(ids: list[int], vocab_size: int, field: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"{field} holds token id {bad}, outside the vocabulary [0, {vocab_size})", field)


def truncate(
    ids: list[int], truncate_prompt_tokens: int | None, max_model_len: int, side: str | None = None
) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the last tokens ("left" truncation, the default) or
    the first ("right")."""
    if truncate_prompt_tokens is None:
        return ids
    keep = max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
    return ids[:keep] if side == "right" else ids[-keep:]


def render_messages(
    tokenizer,
    messages,
    *,
    chat_template: str | None,
    default_template: str | None,
    chat_template_kwargs,
    add_generation_prompt: bool,
    continue_final_message: bool,
    tools=None,
) -> str:
    """The conversation as the model's prompt text (the request's own template, else the
    server's, else the tokenizer's)."""
    try:
        return render_chat(
            tokenizer,
            messages_to_dicts(messages),
            chat_template=chat_template or default_template,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs,
            tools=tools,
            continue_final_message=continue_final_message,
        )
    except ValueError as e:
        param = "chat_template" if "chat_template" in str(e) or "template" in str(e) else "messages"
        raise bad_request(str(e), param) from None
    except Exception as e:  # noqa: BLE001 - the sandbox's refusals (OverflowError, SecurityError...)
        # Rendering depends only on the request (its messages, maybe its own template): a
        # template that breaks on them is the request's fault, never a 500.
        param = "chat_template" if chat_template else "messages"
        raise bad_request(f"the chat template failed to render: {type(e).__name__}: {e}", param) from None


def chat_template_kwargs(req) -> dict | None:
    """chat_template_kwargs plus vLLM's extras for the template: reasoning_effort (and the
    enable_thinking switch it implies unless given) and documents."""
    kw = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:
        if req.reasoning_effort not in REASONING_EFFORTS:
            raise bad_request(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}", "reasoning_effort")
        kw.setdefault("reasoning_effort", req.reasoning_effort)
        kw.setdefault("enable_thinking", req.reasoning_effort != "none")
    if req.documents is not None:
        kw.setdefault("documents", req.documents)
    return kw or None


async def chat_prompt(serving, req, template_kwargs: dict | None) -> tuple[str, list[int]]:
    """(prompt text, token ids) of a chat request."""
    text = render_messages(
        serving.tokenizer,
        req.messages,
        chat_template=req.chat_template,
        default_template=serving.chat_template,
        chat_template_kwargs=template_kwargs,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        tools=req.tools,
    )
    # The template already wrote BOS where the model wants it (vLLM's chat default).
    add_special = False if req.add_special_tokens is None else req.add_special_tokens
    ids = await encode(serving.tokenizer, text, add_special)
    if not ids:
        raise bad_request("the rendered conversation has no tokens", "messages")
    return text, truncate(ids, req.truncate_prompt_tokens, serving.max_model_len, req.truncation_side)


async def completion_prompts(serving, req) -> list[tuple[str, str | None, list[int]]]:
    """(field, text or None, token ids) per prompt of a completions request; the field is
    `prompt`, or `prompt[i]` when there are several."""
    add_special = True if req.add_special_tokens is None else req.add_special_tokens
    prompts = req.prompts()
    many = len(prompts) > 1
    out = []
    for i, p in enumerate(prompts):
        field = f"prompt[{i}]" if many else "prompt"
        if isinstance(p, str):
            ids = await encode(serving.tokenizer, p, add_special)
            if not ids:
                raise bad_request(f"{field} encodes to no tokens; send some text", field)
        else:
            ids = p
            check_token_ids(ids, serving.vocab_size, field)
        ids = truncate(ids, req.truncate_prompt_tokens, serving.max_model_len, req.truncation_side)
        out.append((field, p if isinstance(p, str) else None, ids))
    return out
