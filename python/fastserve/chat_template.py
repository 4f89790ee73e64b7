"""Chat templates: render a conversation to the prompt text the model was trained on.

Hugging Face chat templates are Jinja; they run in a sandboxed environment (a template comes
from the checkpoint or the client's request, so it must not reach Python internals) with the
globals transformers provides: `raise_exception`, `strftime_now`, `bos_token`, `eos_token`."""

from __future__ import annotations

import datetime
import functools
import os
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """A template raised (through raise_exception) or failed to render: a bad request."""


def _raise_exception(message: str):
    raise TemplateError(f"chat template error: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False):
    import json

    # transformers' tojson keeps non-ASCII characters (Jinja's default escapes them).
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat_template is not valid Jinja (line {e.lineno}: {e.message})") from e


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a path to a file, or the template itself (vLLM accepts both)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value and (os.sep in value or value.endswith((".jinja", ".j2", ".txt"))):
        raise ValueError(
            f"chat_template file {value!r} does not exist; pass a path to a Jinja file or the template text itself"
        )
    return value


def render_chat(
    tokenizer,
    messages: list[dict[str, Any]],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
    tools=None,
    continue_final_message: bool = False,
) -> str:
    """The prompt text for `messages` ({"role", "content", ...} dicts).

    `chat_template` overrides the tokenizer's; `chat_template_kwargs` become template
    variables (e.g. {"enable_thinking": False} for Qwen3). With `continue_final_message` the
    text stops right after the last (assistant) message's content, so the model continues it."""
    source = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if not source:
        raise ValueError(
            "chat_template: this tokenizer has no chat template; pass one with "
            "--chat-template (a file or the Jinja text) or the request's "
            "chat_template field"
        )
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    variables = dict(chat_template_kwargs or {})
    for reserved in ("messages", "add_generation_prompt", "bos_token", "eos_token"):
        variables.pop(reserved, None)
    try:
        text = _compile(source).render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=getattr(tokenizer, "bos_token", None) or "",
            eos_token=getattr(tokenizer, "eos_token", None) or "",
            **variables,
        )
    except TemplateError:
        raise
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template failed to render: {e}") from e
    if continue_final_message:
        final = messages[-1].get("content") or ""
        if not isinstance(final, str) or final.strip() == "":
            raise ValueError("continue_final_message needs a final message with text content")
        i = text.rfind(final.strip())
        if i < 0:
            raise ValueError(
                "continue_final_message: the final message's content does not appear in the rendered template"
            )
        text = text[: i + len(final.strip())]
    return text
