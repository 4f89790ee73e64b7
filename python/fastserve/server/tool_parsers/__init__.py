"""Tool-call parsers, by vLLM's `--tool-call-parser` names: the model's text -> OpenAI
`tool_calls` (whole answers and streamed deltas), and the grammar that enforces
`tool_choice: "required"` or a named function in each parser's own format.

    hermes       <tool_call>{"name": ..., "arguments": ...}</tool_call>
    llama3_json  {"name": ..., "parameters": ...}; ...
    mistral      [TOOL_CALLS] [{"name": ..., "arguments": ...}]
    pythonic     [fn(a=1), g(b="x")]
"""

from __future__ import annotations

from .base import FunctionCall, ToolCallStreamer, ToolParser, make_tool_call_id, tool_call_json
from .hermes import HermesToolParser
from .llama3_json import Llama3JsonToolParser
from .mistral import MistralToolParser
from .pythonic import PythonicToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
}


def get_tool_parser(name: str | None) -> ToolParser | None:
    if name is None:
        return None
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_PARSERS)}, got {name!r}") from None


__all__ = [
    "TOOL_PARSERS",
    "FunctionCall",
    "ToolCallStreamer",
    "ToolParser",
    "get_tool_parser",
    "make_tool_call_id",
    "tool_call_json",
]
