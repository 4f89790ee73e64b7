"""What every tool-call parser shares: the parsed call, the tool_choice → grammar rules, and
streaming as OpenAI deltas.

A parser turns the model's text into (content, tool calls) (`extract`), says which prefix of
a partial text is safely content and which calls are already complete (`extract_partial`,
for streaming), and builds the grammar that enforces `tool_choice: "required"` or a named
function in its own format (`grammar`). The rules follow vLLM's (0.32): a tool's arguments
are constrained to its `parameters` schema only when the tool says `strict: true`;
`required` and named choice always constrain the call envelope; `auto` is free text unless
some tool is strict."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from fastserve.structured_outputs.params import StructuredOutputsParams


@dataclass
class FunctionCall:
    name: str
    arguments: str  # JSON text


def make_tool_call_id() -> str:
    """vLLM's id format."""
    return f"chatcmpl-tool-{uuid.uuid4().hex[:16]}"


def tool_call_json(call: FunctionCall, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def dumps_arguments(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


# -- tool_choice: which tools a grammar covers and how strictly ------------------------------


def tool_name(tool: dict) -> str:
    return tool["function"]["name"]


def named_choice(tool_choice: Any) -> str | None:
    """The function name of a named tool_choice ({"type": "function", "function": {"name"}})."""
    if isinstance(tool_choice, dict):
        return tool_choice["function"]["name"]
    return None


def choice_mode(tool_choice: Any) -> str:
    """ "auto", "required", "forced" (a named function) or "none"."""
    if named_choice(tool_choice) is not None:
        return "forced"
    return tool_choice or "auto"


def resolve_tools(tools: list[dict], tool_choice: Any) -> list[dict] | None:
    """The tools a structural-tag grammar covers, each with an explicit `strict` (vLLM's
    resolve_tool_strictness at its default level), or None when `auto` needs no grammar."""
    mode = choice_mode(tool_choice)
    if mode == "none":
        return None
    if mode == "forced":
        tools = [t for t in tools if tool_name(t) == named_choice(tool_choice)]
    if mode == "auto" and not any(t["function"].get("strict") is True for t in tools):
        return None
    out = []
    for t in tools:
        f = dict(t["function"])
        f["strict"] = f.get("strict") is True
        out.append({"type": "function", "function": f})
    return out


def arguments_schema(function: dict) -> Any:
    """A strict tool's parameters schema; `true` (any JSON) for a non-strict one."""
    if function.get("strict") is False:
        return True
    return function.get("parameters") if function.get("parameters") is not None else True


def structural_tag_spec(fmt, single_call: bool) -> StructuredOutputsParams:
    """A StructuredOutputsParams from an xgrammar structural-tag format (its pydantic model),
    limited to one call when `single_call` (parallel_tool_calls: false)."""
    from xgrammar.structural_tag import StructuralTag

    tag = fmt if isinstance(fmt, StructuralTag) else StructuralTag(format=fmt)
    if single_call:
        _stop_after_first(tag.format)
    return StructuredOutputsParams(structural_tag=json.dumps(tag.model_dump(), ensure_ascii=False), _param="tools")


def _stop_after_first(node) -> None:
    from pydantic import BaseModel
    from xgrammar.structural_tag import TagsWithSeparatorFormat, TriggeredTagsFormat

    if isinstance(node, (TriggeredTagsFormat, TagsWithSeparatorFormat)):
        node.stop_after_first = True
    if isinstance(node, BaseModel):
        for name in type(node).model_fields:
            _stop_after_first(getattr(node, name))
    elif isinstance(node, (list, tuple)):
        for item in node:
            _stop_after_first(item)


def _params_or_empty(params: Any) -> Any:
    return params if params else {"type": "object", "properties": {}}


def json_tool_call_schema(tools: list[dict], tool_choice: Any, parallel_tool_calls: bool | None) -> dict | None:
    """vLLM's generic JSON form for required/named choice: `required` is an array of
    {"name", "parameters"} objects (parameters enforced), a named choice is the function's
    arguments object itself."""
    mode = choice_mode(tool_choice)
    if mode == "forced":
        fn = next(t["function"] for t in tools if tool_name(t) == named_choice(tool_choice))
        return _params_or_empty(fn.get("parameters"))
    if mode != "required":
        return None
    defs: dict = {}
    any_of = []
    for t in tools:
        params = t["function"].get("parameters")
        if isinstance(params, dict) and "$defs" in params:
            params = dict(params)
            for k, v in params.pop("$defs").items():
                if k in defs and defs[k] != v:
                    raise ValueError(f"tools: definition {k!r} has different schemas in different tools")
                defs[k] = v
        any_of.append(
            {
                "properties": {
                    "name": {"type": "string", "enum": [tool_name(t)]},
                    "parameters": _params_or_empty(params),
                },
                "required": ["name", "parameters"],
            }
        )
    schema: dict = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": any_of}}
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def parse_json_tool_calls(text: str, tool_choice: Any) -> list[FunctionCall] | None:
    """Calls from the generic JSON form (json_tool_call_schema's output), or None."""
    name = named_choice(tool_choice)
    if name is not None:
        return [FunctionCall(name, text)] if text.strip() else []
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(items, list) or not all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in items):
        return None
    return [FunctionCall(x["name"], dumps_arguments(x.get("parameters"))) for x in items]


# -- parsers ------------------------------------------------------------------------------


class ToolParser:
    """Base: the vLLM parser name, and whether it needs special tokens kept in the text
    (its markers may be special tokens)."""

    name: str = ""
    keep_special_tokens = False

    def extract(self, text: str) -> tuple[str | None, list[FunctionCall]]:
        """Whole output -> (content or None, calls); no calls: (text, [])."""
        raise NotImplementedError

    def extract_partial(self, text: str) -> tuple[str, list[FunctionCall]]:
        """A partial output -> (the prefix that is content whatever comes next, the calls
        already complete). Both only grow as text grows."""
        raise NotImplementedError

    def grammar(
        self, tools: list[dict], tool_choice: Any, parallel_tool_calls: bool | None
    ) -> StructuredOutputsParams | None:
        """The constraint that makes the model call tools in this parser's format (None: no
        constraint, e.g. tool_choice auto without strict tools)."""
        schema = json_tool_call_schema(tools, tool_choice, parallel_tool_calls)
        return None if schema is None else StructuredOutputsParams(json=schema, _param="tools")

    def parse_constrained(self, text: str, tool_choice: Any) -> list[FunctionCall] | None:
        """Calls from output made under `grammar()` for required/named choice."""
        return parse_json_tool_calls(text, tool_choice)


class ToolCallStreamer:
    """Streams one choice's output as OpenAI chat deltas: content as soon as it is certainly
    content, and each tool call as one delta ({"index", "id", "type", "function": {"name",
    "arguments"}}) once it is complete. The deltas concatenate to the non-streamed answer:
    `finish()` extracts from the whole text and sends what the partial view held back."""

    def __init__(self, parser: ToolParser, constrained_choice: Any = None) -> None:
        self.parser = parser
        # required/named under the generic JSON grammar: calls come only at the end.
        self.constrained_choice = constrained_choice
        self.text = ""
        self.sent_content = 0
        self.sent_calls = 0
        self.ids: list[str] = []
        self.calls: list[FunctionCall] = []

    def _delta(self, content: str | None, calls: list[FunctionCall]) -> tuple[str, list[dict]]:
        out = []
        for call in calls[self.sent_calls :]:
            cid = make_tool_call_id()
            self.ids.append(cid)
            self.calls.append(call)
            out.append({"index": self.sent_calls, **tool_call_json(call, cid)})
            self.sent_calls += 1
        content = content or ""
        delta = content[self.sent_content :] if len(content) > self.sent_content else ""
        self.sent_content = max(self.sent_content, len(content))
        return delta, out

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        """(content delta, tool-call deltas) now safe to send."""
        self.text += delta
        if self.constrained_choice is not None:
            return "", []
        content, calls = self.parser.extract_partial(self.text)
        return self._delta(content, calls)

    def finish(self) -> tuple[str, list[dict]]:
        """The rest, at the end of the output."""
        if self.constrained_choice is not None:
            calls = self.parser.parse_constrained(self.text, self.constrained_choice) or []
            return self._delta(None if calls else self.text, calls)
        content, calls = self.parser.extract(self.text)
        if calls and len(calls) < self.sent_calls:  # cannot happen: completed calls stay complete
            calls = self.calls
        return self._delta(content, calls)
