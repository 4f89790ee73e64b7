"""`--tool-call-parser mistral` (Mistral 7B Instruct v0.3, Mixtral; the pre-v11 format):

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]

Content is the text before [TOOL_CALLS]. Required and named choice make the model write the
bare JSON array (vLLM's guided schema for tokenizers without Mistral's own grammar)."""

from __future__ import annotations

import json
import re
from typing import Any

from fastserve.structured_outputs.params import StructuredOutputsParams

from .base import FunctionCall, ToolParser, choice_mode, dumps_arguments, named_choice, partial_suffix, tool_name

BOT = "[TOOL_CALLS]"
_DECODER = json.JSONDecoder()


def _array_calls(text: str) -> list[FunctionCall] | None:
    text = text.strip()
    try:
        parsed, _ = _DECODER.raw_decode(text)
    except ValueError:
        m = re.search(r"\[{.*}\]", text, re.DOTALL)
        if m is None:
            return None
        try:
            parsed = json.loads(m.group(0))
        except ValueError:
            return None
    if isinstance(parsed, dict):
        parsed = [parsed]
    if not isinstance(parsed, list) or not parsed:
        return None
    calls = []
    for x in parsed:
        if not isinstance(x, dict) or not isinstance(x.get("name"), str):
            return None
        calls.append(FunctionCall(x["name"], dumps_arguments(x.get("arguments", {}))))
    return calls


class MistralToolParser(ToolParser):
    name = "mistral"
    keep_special_tokens = True  # [TOOL_CALLS] is a special token in Mistral's vocabulary

    def extract(self, text: str) -> tuple[str | None, list[FunctionCall]]:
        if BOT not in text:
            return text, []
        content, *segments = text.split(BOT)
        body = next((s.strip() for s in segments if s.strip()), "")
        calls = _array_calls(body)
        if not calls:
            return text, []
        return content or None, calls

    def extract_partial(self, text: str) -> tuple[str, list[FunctionCall]]:
        i = text.find(BOT)
        if i < 0:
            return text[: len(text) - partial_suffix(text, BOT)], []
        body = text[i + len(BOT) :].strip()
        try:
            _DECODER.raw_decode(body)
        except ValueError:
            return text[:i], []  # the array is not complete yet
        return text[:i], _array_calls(body) or []

    def grammar(self, tools: list[dict], tool_choice: Any, parallel_tool_calls: bool | None):
        mode = choice_mode(tool_choice)
        if mode not in ("required", "forced"):
            return None
        chosen = tools if mode == "required" else [t for t in tools if tool_name(t) == named_choice(tool_choice)]
        any_of = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [tool_name(t)]},
                    "arguments": t["function"].get("parameters") or {"type": "object"},
                },
                "required": ["name", "arguments"],
            }
            for t in chosen
        ]
        schema: dict = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": any_of}}
        if mode == "forced":
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema, _param="tools")

    def parse_constrained(self, text: str, tool_choice: Any) -> list[FunctionCall] | None:
        if BOT in text:
            return self.extract(text)[1]
        return _array_calls(text)
