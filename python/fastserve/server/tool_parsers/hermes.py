"""`--tool-call-parser hermes` (Hermes 2 Pro, Qwen2.5/3 and most ChatML tool templates):

    some text<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Content is the text before the first <tool_call>; a block left open at the end of the
output still counts when its JSON is complete (vLLM's rule)."""

from __future__ import annotations

import json
import re
from typing import Any

from .base import (
    FunctionCall,
    ToolParser,
    arguments_schema,
    choice_mode,
    dumps_arguments,
    partial_suffix,
    resolve_tools,
    structural_tag_spec,
    tool_name,
)

START, END = "<tool_call>", "</tool_call>"
_BLOCKS = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


def _call(body: str) -> FunctionCall:
    obj = json.loads(body)
    return FunctionCall(obj["name"], dumps_arguments(obj["arguments"]))


class HermesToolParser(ToolParser):
    name = "hermes"
    keep_special_tokens = True  # <tool_call> is a special token in several vocabularies

    def extract(self, text: str) -> tuple[str | None, list[FunctionCall]]:
        if START not in text:
            return text, []
        try:
            calls = [_call(a or b) for a, b in _BLOCKS.findall(text)]
        except (ValueError, KeyError, TypeError):
            return text, []
        content = text[: text.find(START)]
        return content or None, calls

    def extract_partial(self, text: str) -> tuple[str, list[FunctionCall]]:
        i = text.find(START)
        if i < 0:
            return text[: len(text) - partial_suffix(text, START)], []
        calls = []
        for body in re.findall(r"<tool_call>(.*?)</tool_call>", text[i:], re.DOTALL):
            try:
                calls.append(_call(body))
            except (ValueError, KeyError, TypeError):
                break  # the whole output will be content; nothing more streams as a call
        return text[:i], calls

    def grammar(self, tools: list[dict], tool_choice: Any, parallel_tool_calls: bool | None):
        """vLLM's hermes structural tag: each tool's call in both whitespace layouts."""
        resolved = resolve_tools(tools, tool_choice)
        if resolved is None:
            return None
        from xgrammar.structural_tag import JSONSchemaFormat, TagFormat, TagsWithSeparatorFormat, TriggeredTagsFormat

        tags = [
            TagFormat(
                begin=begin + tool_name(t) + '", "arguments": ',
                content=JSONSchemaFormat(json_schema=arguments_schema(t["function"])),
                end=end,
            )
            for t in resolved
            for begin, end in ((START + '\n{"name": "', "}\n" + END), (START + '{"name": "', "}" + END))
        ]
        mode = choice_mode(tool_choice)
        if mode == "auto":
            fmt = TriggeredTagsFormat(triggers=[START], tags=tags)
        else:
            fmt = TagsWithSeparatorFormat(tags=tags, separator="", at_least_one=True, stop_after_first=mode == "forced")
        return structural_tag_spec(fmt, single_call=parallel_tool_calls is False)

    def parse_constrained(self, text: str, tool_choice: Any) -> list[FunctionCall] | None:
        return self.extract(text)[1]
