"""One chat request's tool calling: its `tools` / `tool_choice` / `parallel_tool_calls`
checked (400s naming the field), the grammar that enforces required or named choice, and
the model's text turned into the message's content and `tool_calls` (vLLM's rules).

    tool_choice   grammar                               finish_reason when a tool is called
    none          -                                     (no parsing)
    auto          only if some tool is strict           "tool_calls"
    required      one or more calls in the parser's     "tool_calls" (when the output stopped)
                  format
    named         exactly one call of that function     the output's own ("stop"), as OpenAI's
"""

from __future__ import annotations

import logging
from typing import Any

from fastserve.server.errors import bad_request
from fastserve.structured_outputs.params import StructuredOutputsParams

from .base import FunctionCall, ToolCallStreamer, ToolParser, choice_mode, make_tool_call_id, tool_call_json

logger = logging.getLogger("fastserve.server")

_CHOICE_USAGE = 'give "none", "auto", "required" or {"type": "function", "function": {"name": "my_function"}}'


def check_tools(tools: Any, tool_choice: Any) -> None:
    """400 for a malformed `tools` list or a `tool_choice` that cannot apply to it."""
    if tools is not None:
        if not isinstance(tools, list) or not tools:
            raise bad_request("tools must be a non-empty list of tools; leave it out for none", "tools")
        for i, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type", "function") != "function":
                raise bad_request(
                    f'tools[{i}] must be a {{"type": "function", "function": {{...}}}} tool '
                    "(only function tools are supported)",
                    f"tools[{i}].type",
                )
            f = t.get("function")
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
                raise bad_request(f"tools[{i}].function needs a non-empty `name`", f"tools[{i}].function.name")
            if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
                raise bad_request(
                    f"tools[{i}].function.parameters must be a JSON Schema object", f"tools[{i}].function.parameters"
                )
            if f.get("strict") is not None and not isinstance(f["strict"], bool):
                raise bad_request(f"tools[{i}].function.strict must be true or false", f"tools[{i}].function.strict")
    if tool_choice is None or tool_choice == "none":
        return
    if tools is None:
        raise bad_request("tool_choice needs tools: give the tools the model may call", "tool_choice")
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "required"):
            raise bad_request(f"tool_choice {tool_choice!r} is not valid: {_CHOICE_USAGE}", "tool_choice")
        return
    fn = tool_choice.get("function") if tool_choice.get("type", "function") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise bad_request(f"tool_choice must name a function: {_CHOICE_USAGE}", "tool_choice.function.name")
    if fn["name"] not in {t["function"]["name"] for t in tools}:
        raise bad_request(f"tool_choice names {fn['name']!r}, which is not one of the tools", "tool_choice")


class ToolCalling:
    """Built by `for_request`; None when the request calls no tools (no tools, or
    tool_choice none)."""

    def __init__(
        self, parser: ToolParser, tools: list[dict], tool_choice: Any, parallel_tool_calls: bool | None
    ) -> None:
        self.parser = parser
        self.tools = tools
        self.tool_choice = tool_choice
        self.mode = choice_mode(tool_choice)
        self.parallel_tool_calls = parallel_tool_calls
        self.spec = self._grammar()

    @classmethod
    def for_request(cls, req, parser_name: str | None, enable_auto_tool_choice: bool) -> ToolCalling | None:
        check_tools(req.tools, req.tool_choice)
        tool_choice = req.tool_choice
        if req.tools is not None and tool_choice is None:
            tool_choice = "auto"  # OpenAI's default when tools are given
        if req.tools is None or tool_choice == "none":
            return None
        if parser_name is None or (tool_choice == "auto" and not enable_auto_tool_choice):
            flags = (
                "--enable-auto-tool-choice and --tool-call-parser" if tool_choice == "auto" else "--tool-call-parser"
            )
            raise bad_request(
                f'tool_choice {tool_choice!r} needs the server started with {flags} (or send tool_choice "none")',
                "tool_choice",
            )
        from . import get_tool_parser

        return cls(get_tool_parser(parser_name), req.tools, tool_choice, req.parallel_tool_calls)

    def _grammar(self) -> StructuredOutputsParams | None:
        try:
            return self.parser.grammar(self.tools, self.tool_choice, self.parallel_tool_calls)
        except ValueError as e:
            raise bad_request(str(e), "tools") from None

    @property
    def forces_call(self) -> bool:
        return self.mode in ("required", "forced")

    def constraint(self, requested: StructuredOutputsParams | None) -> StructuredOutputsParams | None:
        """The request's constraint with tools: required/named choice's grammar replaces a
        requested format (a call is forced); under auto a requested format applies and the
        tool envelope is then free (vLLM's fallback)."""
        if self.spec is None:
            return requested
        if self.forces_call or requested is None:
            return self.spec
        logger.warning(
            "tool_choice auto with strict tools and a response format: the response format applies, "
            "tool calls are not constrained"
        )
        return requested

    # -- answers ----------------------------------------------------------------------------

    def _calls(self, text: str) -> tuple[str | None, list[FunctionCall]]:
        if self.forces_call and self.spec is not None and self.spec.json is not None:
            calls = self.parser.parse_constrained(text, self.tool_choice) or []
            return (None if calls else text), calls
        content, calls = self.parser.extract(text)
        return content, calls

    def message(self, text: str | None) -> tuple[str | None, list[dict], bool]:
        """(content, tool_calls JSON, whether a tool was called) of a whole answer."""
        content, calls = self._calls(text or "")
        if self.parallel_tool_calls is False:
            calls = calls[:1]
        tool_calls = [tool_call_json(c, make_tool_call_id()) for c in calls]
        if self.forces_call:  # vLLM answers "" rather than null here
            return content or "", tool_calls, bool(calls)
        if calls and content is not None and not content.strip():
            content = None
        return content, tool_calls, bool(calls)

    def finish_reason(self, finish_reason: str | None, called: bool) -> str | None:
        if called and (self.mode == "auto" or (self.mode == "required" and finish_reason == "stop")):
            return "tool_calls"
        return finish_reason

    def streamer(self) -> ToolCallStreamer:
        constrained = (
            self.tool_choice if self.forces_call and self.spec is not None and self.spec.json is not None else None
        )
        return ToolCallStreamer(self.parser, constrained)
