"""`--tool-call-parser llama3_json` (Llama 3.1/3.2 JSON tool calls):

    {"name": "get_weather", "parameters": {"city": "Paris"}}

optionally after <|python_tag|>, several separated by `;`. As in vLLM every JSON object in
the output is read; one that is not a call makes the whole output plain content."""

from __future__ import annotations

import json
from typing import Any

from .base import FunctionCall, ToolParser, dumps_arguments, resolve_tools, structural_tag_spec

BOT = "<|python_tag|>"
_DECODER = json.JSONDecoder()


def _calls(text: str) -> list[FunctionCall] | None:
    """Every JSON object's call, or None when one is not a call or does not parse."""
    calls, end = [], -1
    i = text.find("{")
    while i >= 0:
        if i > end:
            try:
                obj, n = _DECODER.raw_decode(text[i:])
                end = i + n
                args = obj["arguments"] if "arguments" in obj else obj["parameters"]
                calls.append(FunctionCall(obj["name"], dumps_arguments(args)))
            except (ValueError, KeyError, TypeError):
                return None
        i = text.find("{", max(i, end) + 1)
    return calls


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def extract(self, text: str) -> tuple[str | None, list[FunctionCall]]:
        if BOT not in text and "{" not in text:
            return text, []
        calls = _calls(text)
        return (None, calls) if calls else (text, [])

    def extract_partial(self, text: str) -> tuple[str, list[FunctionCall]]:
        head = text.lstrip()
        if not head or BOT.startswith(head):
            return "", []
        if not (head.startswith("{") or head.startswith(BOT)):
            return text, []  # plain text from the start: it streams as content (vLLM's rule)
        calls, end = [], -1
        i = text.find("{")
        while i >= 0:
            try:
                obj, n = _DECODER.raw_decode(text[i:])
            except ValueError:
                break  # not complete yet
            end = i + n
            try:
                args = obj["arguments"] if "arguments" in obj else obj["parameters"]
                calls.append(FunctionCall(obj["name"], dumps_arguments(args)))
            except (KeyError, TypeError):
                break
            i = text.find("{", end)
        return "", calls

    def grammar(self, tools: list[dict], tool_choice: Any, parallel_tool_calls: bool | None):
        """xgrammar's builtin "llama" structural tag (what vLLM uses)."""
        resolved = resolve_tools(tools, tool_choice)
        if resolved is None:
            return None
        import xgrammar as xgr

        tag = xgr.get_model_structural_tag(model="llama", tools=resolved, tool_choice=tool_choice, reasoning=False)
        return structural_tag_spec(tag, single_call=parallel_tool_calls is False)

    def parse_constrained(self, text: str, tool_choice: Any) -> list[FunctionCall] | None:
        return self.extract(text)[1]
